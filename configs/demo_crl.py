"""Demo: critique RL (GRPO with the verdict reward) on the synthetic critique world, on a laptop CPU.

CRL's premise in miniature: a critic fine-tuned on a fallible teacher's critiques copies the
teacher's blind spot, and a reward on exact verdict labels removes it. This world's teacher forgets
the carry into the leading column in 70% of the critiques where there is one (data.world.
teacher_leading_carry_slip), so it calls many right answers wrong; the labels stay exact. The policy
starts from RUN_DIR/cft_warmstart, trained first with configs/demo_cft.py on this world (1200 steps,
~4 minutes): it writes well-formed critiques, inherits the slip (held-out verdict accuracy ~82%,
~7% on right answers with a leading carry) and still samples the carry in ~40% of its critiques
there. GRPO then samples 8 critiques for each of 16 training problems per step and rewards those
whose "Conclusion: right/wrong" verdict matches the label. Measured in docs/recipes.md: held-out
verdict accuracy reaches >= 99% within 10-20 GRPO steps (about a minute).

  cftjax train --config configs/demo_crl.py
  cftjax plot runs/demo_crl
"""

from cftjax.config import base_config

RUN_DIR = "runs/demo_crl"
WORLD_DIR = RUN_DIR + "/world"


def get_config():
  c = base_config()
  c.train.objective = "grpo"
  c.train.run_dir = RUN_DIR
  c.data.synthetic_world = True
  c.data.world_dir = WORLD_DIR
  c.data.template = "cft"  # the warm-started critic's format (verdict "Conclusion: right|wrong")
  c.data.sources = ({"path": WORLD_DIR + "/rl_crl_train.jsonl", "task": "crl", "template": "cft",
                     "name": "crl"},)
  c.data.eval_path = WORLD_DIR + "/heldout.jsonl"
  c.data.batch_size = 16  # prompts per step
  c.data.max_seq_len = 128  # held-out loss rows: one CFT example each, as in configs/demo_cft.py
  c.data.packing = False
  c.data.world.teacher_leading_carry_slip = 0.7  # the fallible teacher of the CFT warm start

  c.model.init_from_run = RUN_DIR + "/cft_warmstart"
  c.model.warmstart_config = "demo_cft.py"  # beside this file
  c.model.warmstart_steps = 0  # demo_cft's own 1200 steps: the critic has learned the teacher's slip
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

  c.optim.lr = 1e-4  # the lr sweeps are in docs/recipes.md
  c.optim.schedule = "constant"
  c.optim.warmup_ratio = 0.0
  c.optim.b2 = 0.98

  c.train.steps = 50  # ~3.5 s a step on 2 CPU cores: ~3 minutes, held-out evals included
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
