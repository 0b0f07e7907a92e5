"""Demo warm start: the frozen base of configs/demo_cft_lora.py, a model that adds, on a laptop CPU.

configs/demo_cft.py's model and optimizer trained from scratch on the world's solver rows
(solver_train.jsonl, `cftjax.data.synthetic.solver_rows`): "What is a + b?" answered with the column
sums from the right and the boxed sum, always correct. It never sees a candidate solution, a critique
or a verdict: the analog of the pretrained model a LoRA fine-tune starts from. `cftjax train --config
configs/demo_cft_lora.py` trains this first (about 4 CPU-minutes; held-out token accuracy ~0.99).
"""

import demo_cft

RUN_DIR = "runs/demo_cft_lora/base"
WORLD_DIR = "runs/demo_cft_lora/world"


def get_config():
  c = demo_cft.get_config()
  c.train.run_dir = RUN_DIR
  c.data.world_dir = WORLD_DIR
  c.data.train_path = WORLD_DIR + "/solver_train.jsonl"
  c.data.eval_path = WORLD_DIR + "/solver_heldout.jsonl"
  c.data.template = "math_cot"

  c.train.steps = 400

  c.checkpoint.best_metric = "eval_loss"
  c.checkpoint.best_mode = "min"

  c.eval.every_steps = 100
  c.eval.at_start = False
  c.eval.verdict_examples = 0  # it writes answers, not verdicts
  c.logging.every_steps = 20
  return c
