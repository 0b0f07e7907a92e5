"""The reference the sampler's and the trainer's log-probs are checked against in tests: one full
forward pass of the decoder (no cache, no chunks) and log softmax at the given tokens."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cftjax.models import Decoder, ModelConfig
from cftjax.models.decoder import token_log_probs


def score_completions(params: Any, cfg: ModelConfig, tokens: np.ndarray, completion_mask: np.ndarray,
                      temperature: float = 1.0) -> np.ndarray:
  """tokens [batch, seq] (prompt then completion, right-padded), completion_mask [batch, seq] (1 on
  completion tokens) -> [batch, seq] float32: log softmax(logits[t-1] / temperature)[tokens[t]] where
  the mask is set, else 0."""
  tokens = jnp.asarray(tokens, jnp.int32)
  logits = jax.jit(lambda p, t: Decoder(cfg).apply({"params": p}, t))(params, tokens)
  logprobs = jnp.pad(token_log_probs(logits[:, :-1], tokens[:, 1:], temperature), ((0, 0), (1, 0)))
  return np.asarray(jnp.where(jnp.asarray(completion_mask) > 0, logprobs, 0.0))
