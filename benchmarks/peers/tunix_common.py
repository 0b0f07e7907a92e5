"""The tunix Qwen2 model (tunix.models.qwen2) built from the benchmark shapes, for the tunix workers:
compute in shapes.dtype, params in param_dtype."""

from __future__ import annotations

from flax import nnx
import jax.numpy as jnp

import harness
from tunix.models.qwen2 import model as qwen2


def qwen2_model(shapes: harness.Shapes, param_dtype: str = "float32") -> qwen2.Qwen2:
  config = qwen2.ModelConfig(
      num_layers=shapes.layers, vocab_size=shapes.vocab, embed_dim=shapes.hidden,
      hidden_dim=shapes.intermediate, num_heads=shapes.heads, head_dim=shapes.head_dim,
      num_kv_heads=shapes.kv_heads, rope_theta=int(shapes.rope_theta), norm_eps=shapes.rms_norm_eps,
      use_tied_embedding=shapes.tie_embeddings, dtype=jnp.dtype(shapes.dtype),
      param_dtype=jnp.dtype(param_dtype))
  return qwen2.Qwen2(config, rngs=nnx.Rngs(shapes.seed))
