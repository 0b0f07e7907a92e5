"""GPU only: `model.attention="cudnn"` (cuDNN flash attention told each row's length) against the masked
XLA attention, through the whole decoder in bf16. Skipped where JAX has no GPU (CI); run by
benchmarks/gpu.sh on a GPU machine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cftjax.models import Decoder, ModelConfig, init_params

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN)")

BF16_TOL = 0.05  # bf16 compute: two kernels round differently; logits are ~1 in magnitude


def test_cudnn_attention_matches_masked_xla_attention_on_real_tokens():
  cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=64, attention_bias=True, dtype="bfloat16")
  params = init_params(cfg, jax.random.key(0))
  seq, lengths = 256, np.array([256, 130, 17, 64])
  segments = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, segments.shape, dtype=np.int32)
  positions = np.broadcast_to(np.arange(seq, dtype=np.int32), segments.shape)
  real = jnp.asarray(segments, jnp.float32)

  def loss_and_logits(attention, params):
    logits = Decoder(cfg.replace(attention=attention)).apply({"params": params}, tokens, positions,
                                                             segments)
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.sum(real * jnp.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]), logits

  results = {}
  for attention in ("xla", "cudnn"):
    step = jax.jit(jax.value_and_grad(lambda p, a=attention: loss_and_logits(a, p), has_aux=True))
    results[attention] = step(params)
  (loss_x, logits_x), grads_x = results["xla"]
  (loss_c, logits_c), grads_c = results["cudnn"]
  mask = np.asarray(segments, bool)
  assert np.max(np.abs(np.asarray(logits_c)[mask] - np.asarray(logits_x)[mask])) < BF16_TOL
  np.testing.assert_allclose(float(loss_c), float(loss_x), rtol=1e-2)
  for got, want in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_x), strict=True):
    scale = float(jnp.max(jnp.abs(want))) + 1e-6
    assert float(jnp.max(jnp.abs(got - want))) / scale < 0.05
