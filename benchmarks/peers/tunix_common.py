"""The tunix Qwen2 model (tunix.models.qwen2) built from the benchmark shapes, for the tunix workers."""

from __future__ import annotations

from flax import nnx

import harness
from tunix.models.qwen2 import model as qwen2


def qwen2_model(shapes: harness.Shapes) -> qwen2.Qwen2:
  config = qwen2.ModelConfig(
      num_layers=shapes.layers, vocab_size=shapes.vocab, embed_dim=shapes.hidden,
      hidden_dim=shapes.intermediate, num_heads=shapes.heads, head_dim=shapes.head_dim,
      num_kv_heads=shapes.kv_heads, rope_theta=int(shapes.rope_theta), norm_eps=shapes.rms_norm_eps,
      use_tied_embedding=False)
  return qwen2.Qwen2(config, rngs=nnx.Rngs(shapes.seed))
