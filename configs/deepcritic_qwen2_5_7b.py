"""DeepCritic (arXiv 2505.00662), stage 2: RL of the SFT critic (configs/deepcritic_qwen2_5_7b_sft.py,
trained first when its run is missing) on PRM800K rows, whose first step rated -1 is the label.
Prompts show the solution's steps as tagged paragraphs numbered from 1 (template step_critique);
the reward is 1 when the critique's last \\boxed{k} names exactly the labelled first wrong step
(k counted from 1, -1 = every step right), else 0 (`step` reward, indexing "deepcritic").

Published here: the data, the prompt convention and the reward. The GRPO settings (8 samples per
prompt at T 1.0, 128 prompts per step, lr 1e-6 constant, no KL, responses up to 8192 tokens, 200
steps) are cftjax's choice, not the paper's: check them against the paper before reporting a
reproduction. ProcessBench F1 with the same prompt convention: configs/eval_step_critic.py.

  cftjax train --config configs/deepcritic_qwen2_5_7b.py
"""

from cftjax.config import base_config

SFT_RUN_DIR = "runs/deepcritic_qwen2_5_7b/sft"


def get_config():
  c = base_config()
  c.train.objective = "grpo"
  c.train.run_dir = "runs/deepcritic_qwen2_5_7b/rl"
  c.model.init_from_run = SFT_RUN_DIR
  c.model.warmstart_config = "deepcritic_qwen2_5_7b_sft.py"  # beside this file
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.sources = ({"path": "data/deepcritic/prm800k_phase2_train.jsonl", "format": "prm800k",
                     "task": "step", "template": "step_critique", "name": "prm800k"},)
  c.data.template = "step_critique"
  c.data.batch_size = 128
  c.data.max_seq_len = 12288
  c.eval.loss_batches = 0
  c.eval.verdict_examples = 0
  c.eval.suite = "configs/eval_step_critic.py"
  c.eval.suite_limit = 0
  c.eval.every_steps = 50
  c.eval.max_new_tokens = 8192

  c.rl.group_size = 8
  c.rl.max_new_tokens = 8192
  c.rl.max_prompt_len = 4096
  c.rl.temperature = 1.0
  c.rl.generation_batch_size = 256
  c.rl.cache_dtype = "bfloat16"
  c.rl.rewards.by_task = {"step": "step"}
  c.rl.rewards.options = {"step": {"indexing": "deepcritic"}}
  c.rl.loss = "grpo"
  c.rl.eps_low = 0.2
  c.rl.eps_high = 0.2
  c.rl.kl_coef = 0.0

  c.optim.lr = 1e-6
  c.optim.schedule = "constant"
  c.optim.warmup_ratio = 0.0
  c.optim.grad_clip_norm = 1.0
  c.train.steps = 200
  c.train.micro_batches = 64
  c.train.chunk_size = 1024
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.checkpoint.every_steps = 10
  c.checkpoint.best_metric = ""
  c.logging.every_steps = 1
  return c
