"""The "splash" backend (Pallas TPU splash attention) against XLA attention, in Pallas' interpreter on
CPU: values and gradients on packed rows, and sharded over a mesh."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cftjax import parallel
from cftjax.models import attention

BATCH, SEQ, HEADS, KV_HEADS, HEAD_DIM = 2, 200, 4, 2, 128  # SEQ is padded to one 256-token block
# float32 throughout; the two kernels differ in summation order (blocked online softmax) only.
RTOL, ATOL = 2e-5, 2e-5


def _inputs():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(BATCH, SEQ, HEADS, HEAD_DIM)).astype(np.float32)
  k, v = (rng.normal(size=(BATCH, SEQ, KV_HEADS, HEAD_DIM)).astype(np.float32) for _ in range(2))
  # Row 0: one sequence; row 1: three packed segments then padding (segment 0).
  segments = np.ones((BATCH, SEQ), np.int32)
  segments[1, 70:150], segments[1, 150:180], segments[1, 180:] = 2, 3, 0
  weights = rng.normal(size=(BATCH, SEQ, HEADS, HEAD_DIM)).astype(np.float32)
  return q, k, v, segments, weights


def _loss_and_grads(attend, q, k, v, segments, weights):
  """(outputs, grads of sum(weights * out) over q, k, v), with padded queries' outputs dropped."""
  real = (segments != 0)[:, :, None, None]
  loss = lambda q, k, v: jnp.sum(jnp.where(real, weights * attend(q, k, v, segments), 0.0))
  out = attend(q, k, v, segments)
  return jnp.where(real, out, 0.0), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _check_against_xla(splash_fn):
  q, k, v, segments, weights = _inputs()
  out, grads = jax.jit(functools.partial(_loss_and_grads, splash_fn))(q, k, v, segments, weights)
  ref_out, ref_grads = jax.jit(functools.partial(_loss_and_grads, attention.xla_attention))(
      q, k, v, segments, weights)
  np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
  for name, grad, ref in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(grad, ref, rtol=RTOL, atol=ATOL, err_msg=f"d{name}")


def test_splash_matches_xla_attention_values_and_gradients():
  _check_against_xla(functools.partial(attention.splash_attention, interpret=True))


def test_splash_sharded_over_rows_and_heads_matches_xla_attention():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
  with parallel.use_mesh(mesh):
    _check_against_xla(functools.partial(attention.splash_attention, interpret=True))


def test_auto_picks_splash_on_tpu():
  assert attention.resolve("auto", "tpu") == "splash"
  assert "tpu" in attention.BACKENDS["splash"].platforms
