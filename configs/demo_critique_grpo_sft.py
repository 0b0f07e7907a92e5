"""Demo warm start: the actor of configs/demo_critique_grpo.py, fine-tuned from scratch on the synthetic
world's actor rows (actor_train.jsonl, cftjax.data.synthetic.actor_rows), on a laptop CPU.

Half the rows teach a worked answer that ALWAYS forgets the carry into the leading column (so every
problem with such a carry fails: the persistently failed prompts); the other half teach a refinement:
given the question, that answer and the rule-based critique with the reference answer, the correct
worked answer. `cftjax train --config configs/demo_critique_grpo.py` trains this first.
"""

import demo_cft

RUN_DIR = "runs/demo_critique_grpo/actor_warmstart"
WORLD_DIR = "runs/demo_critique_grpo/world"


def get_config():
  """configs/demo_cft.py's model and optimizer on the actor rows of a two-digit world."""
  c = demo_cft.get_config()
  c.train.run_dir = RUN_DIR
  c.data.world_dir = WORLD_DIR
  c.data.world.digits = 2  # two-digit additions: short answers, cheap on a CPU
  c.data.world.num_train = 600
  c.data.world.num_heldout = 200
  c.data.train_path = WORLD_DIR + "/actor_train.jsonl"
  c.data.eval_path = WORLD_DIR + "/actor_heldout.jsonl"
  c.data.template = "math_cot"
  c.model.arch.max_position_embeddings = 256  # a refinement row is ~100 tokens

  c.train.steps = 600
  c.mesh.fsdp = 1  # one CPU device

  c.checkpoint.best_metric = "eval_loss"
  c.checkpoint.best_mode = "min"

  c.eval.every_steps = 100
  c.eval.at_start = False
  c.eval.verdict_examples = 0  # an actor writes answers, not verdicts
  c.logging.every_steps = 20
  return c
