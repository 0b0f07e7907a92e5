"""Demo warm start: the step-level critic of configs/demo_step_critic.py, fine-tuned from scratch on
the synthetic world's step-labelled solutions, on a laptop CPU.

Two row sets of the same problems, mixed 1:1: step_train.jsonl (cftjax.data.synthetic.step_rows),
a three-digit addition answered in four steps (the total of each column from the right with its
incoming carry, then the boxed sum) and an exact teacher's deliberate step-wise critique, each step redone
from the question ("3: 4+3+1=08 vs 07 no") up to the first wrong one, then DeepCritic's
"**Answer**: \\boxed{k}" (the first wrong step from 1, -1 when every step is right); and
solver_train.jsonl (`solver_rows`), the question answered with the column sums ("4+3+1=08, ..."), which
teaches computing a column total from the question's digits. In the training solutions every step
slips independently with probability 0.3 (data.world.step_slip_rate), so a critic that writes a step's
own value where its recomputation belongs is wrong on 30% of the steps it checks; the held-out
solutions keep the standard mix (half right, one slip). `cftjax train --config
configs/demo_step_critic.py` trains this first.
"""

import demo_cft
from cftjax.data.synthetic import STEP_CRITIC_TEMPLATE

RUN_DIR = "runs/demo_step_critic/sft_warmstart"
WORLD_DIR = "runs/demo_step_critic/world"


def get_config():
  return config_for(RUN_DIR, WORLD_DIR)


def config_for(run_dir: str, world_dir: str):
  """configs/demo_cft.py's model and optimizer on the step critic and solver rows of a three-digit
  world written in `world_dir`, trained into `run_dir` (configs/demo_cft_lora_base.py uses it too)."""
  c = demo_cft.get_config()
  c.train.run_dir = run_dir
  c.data.world_dir = world_dir
  c.data.world.digits = 3  # three-digit additions: four steps
  c.data.world.num_train = 4000
  c.data.world.num_heldout = 300
  c.data.world.step_solutions = True
  c.data.world.step_slip_rate = 0.3
  c.data.sources = ({"path": world_dir + "/step_train.jsonl", "template": STEP_CRITIC_TEMPLATE,
                     "name": "steps"},
                    {"path": world_dir + "/solver_train.jsonl", "template": "math_cot",
                     "name": "solver"})
  c.data.eval_path = world_dir + "/step_heldout.jsonl"
  c.data.template = STEP_CRITIC_TEMPLATE
  c.data.eval_template = STEP_CRITIC_TEMPLATE
  c.data.max_seq_len = 160  # a row is 93-146 tokens
  c.train.chunk_size = 2560  # = batch_size * max_seq_len: one chunk
  c.model.arch.max_position_embeddings = 256

  c.train.steps = 800
  c.mesh.fsdp = 1  # one CPU device

  c.checkpoint.best_metric = "eval_loss"
  c.checkpoint.best_mode = "min"

  c.eval.every_steps = 400
  c.eval.at_start = False
  c.eval.verdict_examples = 0  # a step critic ends in a step index, not a right/wrong verdict
  c.logging.every_steps = 20
  return c
