"""Demo warm start: the step-level critic of configs/demo_step_critic.py, fine-tuned from scratch on
the synthetic world's step-labelled solutions (step_train.jsonl, cftjax.data.synthetic.step_rows), on
a laptop CPU.

Each row is a three-digit addition answered in four steps (the total of each column from the right
with its incoming carry, then the boxed sum), half of them with one slip (a dropped carry, a column
total off by one, or a wrong boxed digit), and a teacher's deliberate step-wise critique: each step
redone from the question ("3: 4+3+1=08 vs 07 no") up to the first wrong one, then DeepCritic's
"**Answer**: \\boxed{k}" (the first wrong step from 1, -1 when every step is right). The teacher is
fallible: in 70% of its critiques of problems with a carry into the leading column it redoes that
column without the carry (so it names a right leading step as wrong, or passes a leading step that
dropped the carry); it is right on 76% of the rows. `cftjax train --config
configs/demo_step_critic.py` trains this first.
"""

import demo_cft
from cftjax.data.synthetic import STEP_CRITIC_TEMPLATE

RUN_DIR = "runs/demo_step_critic/sft_warmstart"
WORLD_DIR = "runs/demo_step_critic/world"


def get_config():
  """configs/demo_cft.py's model and optimizer on the step critic rows of a three-digit world."""
  c = demo_cft.get_config()
  c.train.run_dir = RUN_DIR
  c.data.world_dir = WORLD_DIR
  c.data.world.digits = 3  # three-digit additions: four steps
  c.data.world.num_train = 4000
  c.data.world.num_heldout = 300
  c.data.world.teacher_leading_carry_slip = 0.7
  c.data.world.step_solutions = True
  c.data.train_path = WORLD_DIR + "/step_train.jsonl"
  c.data.eval_path = WORLD_DIR + "/step_heldout.jsonl"
  c.data.template = STEP_CRITIC_TEMPLATE
  c.data.max_seq_len = 160  # a row is 93-146 tokens
  c.train.chunk_size = 2560  # = batch_size * max_seq_len: one chunk
  c.model.arch.max_position_embeddings = 256

  c.train.steps = 1000
  c.mesh.fsdp = 1  # one CPU device

  c.checkpoint.best_metric = "eval_loss"
  c.checkpoint.best_mode = "min"

  c.eval.every_steps = 250
  c.eval.at_start = False
  c.eval.verdict_examples = 0  # a step critic ends in a step index, not a right/wrong verdict
  c.logging.every_steps = 20
  return c
