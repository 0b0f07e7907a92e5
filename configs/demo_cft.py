"""Demo: a tiny critic trained from scratch on the synthetic critique world, on a laptop CPU.

The world (3-digit additions with right or subtly wrong answers and column-by-column critiques, plus
its own SentencePiece tokenizer) is written into RUN_DIR/world on first use. Before training the model
writes no verdict; after ~8 CPU-minutes of training it checks sums (held-out verdict accuracy >= 90%).

  cftjax train --config configs/demo_cft.py
  cftjax plot runs/demo_cft
"""

from cftjax.config import base_config


def get_config():
  c = base_config()
  c.data.synthetic_world = True
  c.data.template = "cft"
  c.data.max_seq_len = 128  # one example (110-121 tokens) per row
  c.data.batch_size = 16
  c.data.packing = False  # on CPU short unpacked rows train faster than long packed ones

  c.model.arch.hidden_size = 128
  c.model.arch.intermediate_size = 384
  c.model.arch.num_layers = 3
  c.model.arch.num_heads = 4
  c.model.arch.num_kv_heads = 4
  c.model.arch.head_dim = 32
  c.model.arch.max_position_embeddings = 128

  c.optim.lr = 3e-3
  c.optim.warmup_ratio = 0.05
  c.optim.min_lr_ratio = 0.1
  c.optim.b2 = 0.98
  c.optim.weight_decay = 0.01

  c.train.steps = 1200
  c.train.chunk_size = 2048  # = batch_size * max_seq_len: one chunk
  c.mesh.fsdp = -1  # FSDP over every device (one on a plain CPU host)

  c.checkpoint.every_steps = 100
  c.checkpoint.best_metric = "verdict_accuracy"
  c.checkpoint.best_mode = "max"

  c.eval.every_steps = 300
  c.eval.loss_batches = 2
  c.eval.verdict_examples = 200
  c.eval.batch_size = 50
  c.eval.max_new_tokens = 80  # a critique is ~70 tokens
  c.eval.verdict_style = "cft"

  c.logging.every_steps = 10
  return c
