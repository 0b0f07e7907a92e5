"""Demo: critique RL (GRPO with the verdict reward) on the synthetic critique world, on a laptop CPU.

The policy starts from a CFT warm start: RUN_DIR/cft_warmstart, trained first with
configs/demo_cft.py for rl.warmstart_steps steps when it has no best params yet (a critic whose
critiques are well formed but whose verdicts are 78% right). GRPO then samples 8 critiques for each
of 16 training problems per step and rewards those whose "Conclusion: right/wrong" verdict matches
the label. Measured in docs/recipes.md: the sampled reward rises, held-out verdict accuracy only
by ~2-3 points. To start from a finished CFT demo instead:
--config.rl.init_from_run=runs/demo_cft --config.rl.warmstart_config=

  cftjax train --config configs/demo_crl.py
  cftjax plot runs/demo_crl
"""

from cftjax.train.grpo_trainer import grpo_config

RUN_DIR = "runs/demo_crl"
WORLD_DIR = RUN_DIR + "/world"


def get_config():
  c = grpo_config()
  c.train.run_dir = RUN_DIR
  c.data.synthetic_world = True
  c.data.world_dir = WORLD_DIR
  c.data.template = "cft"  # the warm-started critic's format (verdict "Conclusion: right|wrong")
  c.data.sources = ({"path": WORLD_DIR + "/rl_crl_train.jsonl", "task": "crl", "template": "cft",
                     "name": "crl"},)
  c.data.eval_path = WORLD_DIR + "/heldout.jsonl"
  c.data.batch_size = 16  # prompts per step (8 gave updates too noisy to help)
  c.data.max_seq_len = 128  # held-out loss rows: one CFT example each, as in configs/demo_cft.py
  c.data.packing = False

  c.rl.init_from_run = RUN_DIR + "/cft_warmstart"
  c.rl.warmstart_config = "configs/demo_cft.py"
  c.rl.warmstart_steps = 500
  c.rl.group_size = 8
  c.rl.max_new_tokens = 72  # a critique is 56-58 tokens; prompt (50) + completion fit 128
  c.rl.max_prompt_len = 128
  c.rl.temperature = 1.0  # the policy's own distribution
  c.rl.rewards.by_task = {"crl": "verdict"}
  c.rl.rewards.options.verdict.style = "cft"
  c.rl.dynamic_sampling = True
  c.rl.max_draws = 2
  c.rl.eps_low = 0.2
  c.rl.eps_high = 0.28
  c.rl.kl_coef = 0.0

  c.optim.lr = 1e-4  # 2e-4 drifts (held-out loss x3 in 20 steps), 3e-5 barely moves
  c.optim.schedule = "constant"
  c.optim.warmup_ratio = 0.0
  c.optim.b2 = 0.98

  c.train.steps = 50  # ~10 s a step on 2 busy CPU cores: ~9 minutes
  c.train.chunk_size = 2048
  c.mesh.fsdp = 1  # one CPU device

  c.checkpoint.every_steps = 10
  c.checkpoint.best_metric = "verdict_accuracy"
  c.checkpoint.best_mode = "max"

  c.eval.every_steps = 10
  c.eval.loss_batches = 2
  c.eval.verdict_examples = 500  # every held-out row: +-2 points of noise instead of +-3
  c.eval.batch_size = 50
  c.eval.max_new_tokens = 80  # as configs/demo_cft.py
  c.eval.verdict_style = "cft"

  c.logging.every_steps = 1
  return c
