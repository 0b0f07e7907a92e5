"""Demo warm start: the actor of configs/demo_critique_grpo.py, fine-tuned from scratch on the synthetic
world's actor rows (actor_train.jsonl, cftjax.data.synthetic.actor_rows), on a laptop CPU.

Half the rows teach a worked answer that ALWAYS forgets the carry into the leading column (so every
problem with such a carry fails: the persistently failed prompts); the other half teach a refinement:
given the question, that answer and the rule-based critique with the reference answer, the correct
worked answer. `cftjax train --config configs/demo_critique_grpo.py` trains this first.
"""

from cftjax.config import base_config

RUN_DIR = "runs/demo_critique_grpo/actor_warmstart"
WORLD_DIR = "runs/demo_critique_grpo/world"


def get_config():
  c = base_config()
  c.train.run_dir = RUN_DIR
  c.data.synthetic_world = True
  c.data.world_dir = WORLD_DIR
  c.data.world.digits = 2  # two-digit additions: short answers, cheap on a CPU
  c.data.world.num_train = 600
  c.data.world.num_heldout = 200
  c.data.train_path = WORLD_DIR + "/actor_train.jsonl"
  c.data.eval_path = WORLD_DIR + "/actor_heldout.jsonl"
  c.data.template = "math_cot"
  c.data.max_seq_len = 128  # a refinement row is ~100 tokens
  c.data.batch_size = 16
  c.data.packing = False

  c.model.arch.hidden_size = 128
  c.model.arch.intermediate_size = 384
  c.model.arch.num_layers = 3
  c.model.arch.num_heads = 4
  c.model.arch.num_kv_heads = 4
  c.model.arch.head_dim = 32
  c.model.arch.max_position_embeddings = 256

  c.optim.lr = 3e-3
  c.optim.warmup_ratio = 0.05
  c.optim.min_lr_ratio = 0.1
  c.optim.b2 = 0.98
  c.optim.weight_decay = 0.01

  c.train.steps = 600
  c.train.chunk_size = 2048  # = batch_size * max_seq_len: one chunk
  c.mesh.fsdp = 1  # one CPU device

  c.checkpoint.every_steps = 100
  c.checkpoint.best_metric = "eval_loss"
  c.checkpoint.best_mode = "min"

  c.eval.every_steps = 100
  c.eval.at_start = False
  c.eval.loss_batches = 2
  c.eval.verdict_examples = 0  # an actor writes answers, not verdicts
  c.eval.batch_size = 50

  c.logging.every_steps = 20
  return c
