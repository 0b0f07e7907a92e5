"""Critique-GRPO (arXiv 2506.03106) on Qwen2.5-7B base with its released settings.

Per prompt 7 initial responses are sampled at T 1.0; each failed-or-not response gets the rule-based
critique with the reference answer ("simple_gt"), the policy refines it from a second prompt (question
+ previous response + critique), and 1 refinement (a correct one when there is any) joins the group
as an 8th response to the ORIGINAL prompt: n 8 = 7 + 1. Advantages r - mean over the combined group
(no std); refinement tokens use the shaped ratio p / (p + 0.1) with no old-policy denominator and no
clip; no KL; entropy coefficient 0.001; lr 1e-6, 128 prompts per step in mini-batches of 64 (2
updates per step), prompts up to 2048 tokens, responses up to 6144, 400 steps on 4k OpenR1-Math
problems. The paper's "loss summed over tokens / response length" is read as each response's token
sum over its own length (seq_mean_token_mean). Set rl.refinement.when = "all_failed" for the later
version that refines only groups whose initial responses all fail; rl.refinement.critique = "policy"
(self-critique with the CRL template) or "critic" with rl.refinement.critic_run for model-written
critiques (kept only when their verdict agrees with the reward).

  cftjax convert --hf-dir /models/Qwen2.5-7B --out converted/qwen2.5-7b
  cftjax train --config configs/critique_grpo_qwen2_5_7b.py
"""

from cftjax.config import base_config


def get_config():
  c = base_config()
  c.train.objective = "grpo"
  c.model.init_from = "converted/qwen2.5-7b"
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.sources = ({"path": "data/critique_grpo/openr1_math_4k.jsonl", "task": "math",
                     "template": "math_cot", "name": "openr1_math"},)
  c.data.template = "math_cot"
  c.data.eval_path = "data/critique_grpo/openr1_math_4k.jsonl"
  c.data.batch_size = 128
  c.data.max_seq_len = 8192
  c.eval.loss_batches = 0
  c.eval.verdict_examples = 0
  c.eval.suite = "configs/eval_one_shot_cft_math.py"
  c.eval.suite_limit = 0
  c.eval.every_steps = 50
  c.eval.max_new_tokens = 6144

  c.rl.group_size = 7  # + 1 refinement = n 8
  c.rl.max_new_tokens = 6144
  c.rl.max_prompt_len = 2048
  c.rl.temperature = 1.0
  c.rl.generation_batch_size = 256
  c.rl.cache_dtype = "bfloat16"
  c.rl.rewards.by_task = {"math": "math"}
  c.rl.loss = "grpo"
  c.rl.advantage_scale = "none"
  c.rl.aggregation = "seq_mean_token_mean"
  c.rl.eps_low = 0.2
  c.rl.eps_high = 0.2
  c.rl.kl_coef = 0.0
  c.rl.entropy_coef = 0.001
  c.rl.mini_batches = 2  # 128 prompts in mini-batches of 64
  c.rl.refinement.when = "always"
  c.rl.refinement.critique = "simple_gt"
  c.rl.refinement.num_refinements = 1
  c.rl.refinement.shaping_gamma = 0.1
  c.rl.refinement.critique_template = "crl"

  c.optim.lr = 1e-6
  c.optim.schedule = "constant"
  c.optim.warmup_ratio = 0.0
  c.optim.grad_clip_norm = 1.0
  c.train.steps = 400
  c.train.micro_batches = 64  # 512 rows per update -> 8 rows per micro-batch
  c.train.chunk_size = 1024
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.checkpoint.every_steps = 10
  c.checkpoint.best_metric = ""
  c.logging.every_steps = 1
  return c
