"""Chunked cross-entropy and token log-probs against unchunked optax / float64 numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cftjax.models.decoder import token_log_probs
from cftjax.train import losses

BATCH, SEQ, DIM, VOCAB = 2, 12, 16, 37


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(BATCH, SEQ, DIM)).astype(np.float32)
  lm_head = rng.normal(size=(DIM, VOCAB)).astype(np.float32) * 0.5
  targets = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
  loss_mask = (rng.random((BATCH, SEQ)) > 0.3).astype(np.float32)
  loss_mask[1, :4] = 0.0
  return hidden, lm_head, targets, loss_mask


def _np_log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _optax_loss_sum(hidden, lm_head, targets, loss_mask):
  logits = jnp.einsum("btd,dv->btv", hidden, lm_head)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(nll * loss_mask)


_optax_value_and_grad = jax.jit(jax.value_and_grad(_optax_loss_sum, argnums=(0, 1)))


def _chunked_loss_sum(targets, loss_mask, chunk_size):
  """(hidden, lm_head) -> the chunked CE loss_sum, for differentiating."""
  return lambda h, w: losses.chunked_cross_entropy(h, w, targets, loss_mask, chunk_size)["loss_sum"]


@pytest.mark.parametrize("chunk_size", [1, 8, 10, 14, 100])  # 2 x 12 tokens
def test_chunked_equals_unchunked_loss_and_gradients(chunk_size):
  hidden, lm_head, targets, loss_mask = _inputs()
  chunked = _chunked_loss_sum(targets, loss_mask, chunk_size)
  loss, (g_hidden, g_head) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, lm_head)
  ref_loss, (ref_g_hidden, ref_g_head) = _optax_value_and_grad(hidden, lm_head, targets, loss_mask)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(g_hidden, ref_g_hidden, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(g_head, ref_g_head, rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(g_hidden)[loss_mask == 0] == 0.0)


@pytest.mark.parametrize("chunk_size", [8, 100])  # 2 x 12 tokens: 3 chunks, 1 chunk
@pytest.mark.parametrize("argnums, lm_head_products", [((0, 1), 3), ((0,), 2)])
def test_the_loss_gradient_is_taken_in_the_forward_pass(chunk_size, argnums, lm_head_products):
  """The CE loss's gradient holds the logits' LM-head product and one product per differentiated
  operand, taken in the forward pass: no chunk's logits are recomputed, a frozen head gets none."""
  hidden, lm_head, targets, loss_mask = _inputs()
  chunked = _chunked_loss_sum(targets, loss_mask, chunk_size)
  jaxpr = str(jax.make_jaxpr(jax.grad(chunked, argnums=argnums))(hidden, lm_head))
  assert jaxpr.count("dot_general") == lm_head_products


@pytest.mark.parametrize("chunk_size, lm_head_products", [(8, 4), (100, 3)])  # 2 x 12 tokens
def test_only_several_chunks_of_log_probs_recompute_their_logits(chunk_size, lm_head_products):
  """Token log-probs (any downstream loss) are differentiated in the backward pass: several chunks
  recompute their logits (one more product), a single chunk keeps its logits."""
  hidden, lm_head, targets, loss_mask = _inputs()
  log_prob_sum = lambda h, w: jnp.sum(loss_mask * losses.chunked_token_log_probs(h, w, targets, chunk_size)[0])
  jaxpr = str(jax.make_jaxpr(jax.grad(log_prob_sum, argnums=(0, 1)))(hidden, lm_head))
  assert jaxpr.count("dot_general") == lm_head_products


@pytest.mark.parametrize("chunk_size", [7, 100])
def test_z_loss_and_weight_gradients_match_unchunked(chunk_size):
  """Gradients of loss_sum with a z-loss, with respect to hidden, head and the per-token weights (the
  loss mask, here real-valued), against jax autodiff of the unchunked optax loss."""
  hidden, lm_head, targets, _ = _inputs(6)
  weights = np.random.default_rng(6).random(targets.shape).astype(np.float32)
  z_weight = 1e-2

  def chunked(h, w, m):
    return losses.chunked_cross_entropy(h, w, targets, m, chunk_size, z_loss_weight=z_weight)["loss_sum"]

  def unchunked(h, w, m):
    logits = jnp.einsum("btd,dv->btv", h, w)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(m * (nll + z_weight * jnp.square(jax.nn.logsumexp(logits, axis=-1))))

  got = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(hidden, lm_head, weights)
  want = jax.jit(jax.value_and_grad(unchunked, argnums=(0, 1, 2)))(hidden, lm_head, weights)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_sums_match_float64_numpy_including_z_loss_accuracy_entropy():
  hidden, lm_head, targets, loss_mask = _inputs(1)
  z_weight = 1e-3
  out = losses.chunked_cross_entropy(hidden, lm_head, targets, loss_mask, chunk_size=7,
                                     z_loss_weight=z_weight)
  logits = np.einsum("btd,dv->btv", hidden.astype(np.float64), lm_head.astype(np.float64))
  log_probs = _np_log_softmax(logits)
  log_z = np.log(np.exp(logits).sum(-1))
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  entropy = -(np.exp(log_probs) * log_probs).sum(-1)
  correct = (logits.argmax(-1) == targets).astype(np.float64)
  z_loss = z_weight * (loss_mask * log_z**2).sum()
  np.testing.assert_allclose(out["z_loss_sum"], z_loss, rtol=1e-5)
  np.testing.assert_allclose(out["loss_sum"], (loss_mask * nll).sum() + z_loss, rtol=1e-5)
  np.testing.assert_allclose(out["token_count"], loss_mask.sum())
  np.testing.assert_allclose(out["correct_sum"], (loss_mask * correct).sum())
  np.testing.assert_allclose(out["entropy_sum"], (loss_mask * entropy).sum(), rtol=1e-5)


def test_forced_correct_targets_count_as_correct():
  hidden, lm_head, _, loss_mask = _inputs(2)
  argmax_targets = np.einsum("btd,dv->btv", hidden, lm_head).argmax(-1).astype(np.int32)
  out = losses.chunked_cross_entropy(hidden, lm_head, argmax_targets, loss_mask, chunk_size=5)
  assert float(out["correct_sum"]) == loss_mask.sum()


def test_a_target_tied_for_the_largest_logit_counts_as_correct():
  """Accuracy is "the target's logit is the largest": a target tied with a lower id counts too (an
  argmax would name the lower id)."""
  hidden = np.ones((1, 2, 4), np.float32)
  lm_head = np.zeros((4, 5), np.float32)
  lm_head[:, 1] = lm_head[:, 3] = 1.0  # ids 1 and 3 tie for the largest logit
  out = losses.chunked_cross_entropy(hidden, lm_head, np.array([[3, 2]], np.int32), np.ones((1, 2), np.float32),
                                     chunk_size=4)
  assert float(out["correct_sum"]) == 1.0


def test_token_log_probs_with_temperature_matches_numpy():
  hidden, lm_head, targets, _ = _inputs(3)
  logits = np.einsum("btd,dv->btv", hidden, lm_head)
  temperature = 0.6
  ref_log_probs = _np_log_softmax(logits.astype(np.float64) / temperature)
  ref = np.take_along_axis(ref_log_probs, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(token_log_probs(logits, targets, temperature), ref,
                             rtol=1e-5, atol=1e-5)
  log_probs, entropy = losses.chunked_token_log_probs(hidden, lm_head, targets, chunk_size=5,
                                                      temperature=temperature)
  np.testing.assert_allclose(log_probs, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(entropy, -(np.exp(ref_log_probs) * ref_log_probs).sum(-1),
                             rtol=1e-5, atol=1e-5)


def test_chunked_log_prob_gradients_match_unchunked():
  hidden, lm_head, targets, loss_mask = _inputs(4)
  weights = np.random.default_rng(4).normal(size=targets.shape).astype(np.float32)

  def chunked(w):
    log_probs, entropy = losses.chunked_token_log_probs(hidden, w, targets, 5, temperature=0.7)
    return jnp.sum(weights * log_probs + 0.1 * loss_mask * entropy)

  def unchunked(w):
    logits = jnp.einsum("btd,dv->btv", hidden, w) / 0.7
    log_probs = jax.nn.log_softmax(logits)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, -1)
    target_lp = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    return jnp.sum(weights * target_lp + 0.1 * loss_mask * entropy)

  np.testing.assert_allclose(jax.jit(jax.grad(chunked))(lm_head),
                             jax.jit(jax.grad(unchunked))(lm_head), rtol=1e-5, atol=1e-5)


def test_bfloat16_logits_stay_close():
  hidden, lm_head, targets, loss_mask = _inputs(5)
  out = losses.chunked_cross_entropy(hidden, lm_head, targets, loss_mask, 8,
                                     logits_dtype=jnp.bfloat16)
  assert out["loss_sum"].dtype == jnp.float32
  np.testing.assert_allclose(out["loss_sum"], _optax_loss_sum(hidden, lm_head, targets, loss_mask),
                             rtol=2e-2)


def test_bad_shapes_and_chunk_size_raise():
  hidden, lm_head, targets, loss_mask = _inputs()
  with pytest.raises(ValueError, match="chunk_size"):
    losses.chunked_cross_entropy(hidden, lm_head, targets, loss_mask, 0)
  with pytest.raises(ValueError, match="lm_head"):
    losses.chunked_cross_entropy(hidden, lm_head[:-1], targets, loss_mask, 4)


def _temp_bytes(loss_fn, num_tokens: int, vocab: int, dim: int = 64) -> int:
  shapes = (jax.ShapeDtypeStruct((1, num_tokens, dim), jnp.float32),
            jax.ShapeDtypeStruct((dim, vocab), jnp.float32),
            jax.ShapeDtypeStruct((1, num_tokens), jnp.int32),
            jax.ShapeDtypeStruct((1, num_tokens), jnp.float32))
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
  return step.lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_compiled_peak_memory_does_not_scale_with_tokens_times_vocab():
  chunk = 128

  def chunked(h, w, t, m):
    return losses.chunked_cross_entropy(h, w, t, m, chunk)["loss_sum"]

  figures = {}
  for vocab in (8192, 32768):
    for num_tokens in (2048, 4096):
      figures[("chunked", num_tokens, vocab)] = _temp_bytes(chunked, num_tokens, vocab)
    figures[("unchunked", 2048, vocab)] = _temp_bytes(_optax_loss_sum, 2048, vocab)
  for (kind, num_tokens, vocab), temp in figures.items():
    print(f"CE value_and_grad temp memory [{kind}] tokens={num_tokens} vocab={vocab}: "
          f"{temp / 2**20:.1f} MiB (tokens*vocab*4 = {num_tokens * vocab * 4 / 2**20:.0f} MiB)")
  for vocab in (8192, 32768):
    logits_bytes = 2048 * vocab * 4
    assert figures[("chunked", 2048, vocab)] < logits_bytes / 4
    assert figures[("unchunked", 2048, vocab)] >= logits_bytes
    # Doubling the tokens adds only per-token vectors, not another tokens x vocab block.
    growth = figures[("chunked", 4096, vocab)] - figures[("chunked", 2048, vocab)]
    assert growth < 0.05 * logits_bytes
  # Per-chunk blocks scale with chunk * vocab.
  assert figures[("chunked", 2048, 32768)] <= 4 * chunk * 32768 * 4


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2), (1, 2, 4), (2, 4, 1)])
@pytest.mark.parametrize("vocab, rows_gathered", [(64, False), (2048, True)])
def test_sharded_cross_entropy_matches_optax_whichever_operand_it_gathers(mesh_shape, vocab, rows_gathered):
  """Under FSDP (+ data, + tensor) meshes of the 8 CPU devices: loss, accuracy, entropy and the
  gradients of hidden states and head equal the one-device optax / numpy references, whether the
  step gathers the head (a group's 96-192 tokens outnumber a 16-64 entry vocab slice) or the group's
  hidden rows (the slice has 512-2048 entries). The compiled program shows which it gathered."""
  from cftjax import hlo, parallel  # pylint: disable=import-outside-toplevel
  data, fsdp, tensor = mesh_shape
  batch, seq, dim = 8, 24, 32
  rng = np.random.default_rng(1)
  hidden = rng.normal(size=(batch, seq, dim)).astype(np.float32)
  lm_head = rng.normal(size=(dim, vocab)).astype(np.float32) * 0.5
  targets = rng.integers(0, vocab, size=(batch, seq)).astype(np.int32)
  loss_mask = (rng.random((batch, seq)) > 0.3).astype(np.float32)
  loss_and_stats = lambda h, w: (lambda s: (s["loss_sum"], s))(
      losses.chunked_cross_entropy(h, w, targets, loss_mask, chunk_size=40))
  mesh = parallel.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor}, jax.devices()[:8])
  with parallel.use_mesh(mesh):
    shardings = (parallel.logical_sharding(hidden.shape, ("batch", "seq", "act_embed")),
                 parallel.logical_sharding(lm_head.shape, ("embed", "vocab")))
    step = jax.jit(parallel.bind(jax.value_and_grad(loss_and_stats, argnums=(0, 1), has_aux=True)),
                   in_shardings=shardings)
    (loss, stats), (d_hidden, d_head) = step(hidden, lm_head)
    text = step.lower(hidden, lm_head).compile().as_text()

  want_loss, (want_d_hidden, want_d_head) = _optax_value_and_grad(hidden, lm_head, targets, loss_mask)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(d_hidden), np.asarray(want_d_hidden), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(d_head), np.asarray(want_d_head), rtol=1e-5, atol=1e-6)
  log_p = _np_log_softmax(np.einsum("btd,dv->btv", hidden.astype(np.float64), lm_head))
  correct = (log_p.argmax(-1) == targets) * loss_mask
  entropy = -(np.exp(log_p) * log_p).sum(-1) * loss_mask
  assert float(stats["correct_sum"]) == correct.sum()
  np.testing.assert_allclose(float(stats["entropy_sum"]), entropy.sum(), rtol=1e-5)

  group_rows = batch // (data * fsdp) * fsdp
  gathered = {c.arrays[0].shape for c in hlo.collectives(text) if c.kind == "all-gather"}
  assert ((group_rows, seq, dim) in gathered) == rows_gathered
  assert ((dim, vocab // tensor) in gathered) == (not rows_gathered)
