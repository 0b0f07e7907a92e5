"""Tests for the sharded CFT step: gradient accumulation == one full batch, every mesh == one device,
optax full-logits cross-entropy as the reference, sharded state creation, bf16 compute, eval step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from cftjax import config as config_lib
from cftjax import parallel
from cftjax.models import Decoder, ModelConfig, abstract_params
from cftjax.train.cft import cft_grad_sums, make_cft_step
from cftjax.train.run import make_eval_step
from cftjax.train.state import make_optimizer
from cftjax.train.state import create_train_state

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
BATCH, SEQ = 16, 16
CHUNK = 40  # does not divide the token count: exercises the padded last chunk
# f32 sums reordered by sharding, micro-batching or chunking: observed <= 4.5e-7 relative per param.
F32_RTOL = 1e-6


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
  """A packed CFT batch: two examples per row (positions restart), right padding, one masked row."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, CFG.vocab_size, (BATCH, SEQ), dtype=np.int32)
  targets = rng.integers(0, CFG.vocab_size, (BATCH, SEQ), dtype=np.int32)
  segment_ids = np.zeros((BATCH, SEQ), np.int32)
  positions = np.zeros((BATCH, SEQ), np.int32)
  loss_mask = np.zeros((BATCH, SEQ), np.float32)
  for row in range(BATCH):
    first, used = rng.integers(3, 9), rng.integers(10, SEQ + 1)
    segment_ids[row, :first], segment_ids[row, first:used] = 1, 2
    positions[row, :first], positions[row, first:used] = np.arange(first), np.arange(used - first)
    loss_mask[row, :used] = rng.random(used) < 0.6
  loss_mask[3] = 0.0
  return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask, "positions": positions,
          "segment_ids": segment_ids}


@pytest.fixture(scope="module")
def batch():
  return make_batch()


def mesh_of(data, fsdp, tensor):
  return parallel.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor},
                            jax.devices()[:data * fsdp * tensor])


@functools.cache
def fresh_state():
  """A TrainState initialised directly sharded on a 1x8x1 mesh (bf16 params in the model config)."""
  with parallel.use_mesh(mesh_of(1, 8, 1)):
    return create_train_state(CFG.replace(param_dtype="bfloat16"), optax.adam(1e-3), jax.random.key(3))


@functools.cache
def initial_params() -> dict:
  return jax.tree.map(np.asarray, fresh_state().params)


@pytest.fixture(scope="module")
def params():
  return initial_params()


@pytest.fixture(scope="module")
def reference(params, batch):
  """One-device mean masked CE, its gradient and the correct count, from full logits and optax's
  cross-entropy."""
  def mean_loss(p):
    logits = Decoder(CFG).apply({"params": p}, batch["inputs"], batch["positions"], batch["segment_ids"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * batch["loss_mask"])
    return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"]), correct

  (loss, correct), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params)
  return {"loss": float(loss), "grads": jax.tree.map(np.asarray, grads), "correct": float(correct),
          "tokens": float(batch["loss_mask"].sum())}


@functools.cache
def sharded_loss_and_grads(mesh_shape: tuple[int, int, int], micro_batches: int,
                           compute_dtype: str = "float32"):
  """(mean loss, mean-loss grads as numpy, grad leaves' dtypes) from cft_grad_sums on a mesh."""
  with parallel.use_mesh(mesh_of(*mesh_shape)):
    grads_fn = jax.jit(
        parallel.bind(functools.partial(cft_grad_sums, CFG, micro_batches=micro_batches,
                                        chunk_size=CHUNK, compute_dtype=compute_dtype)),
        in_shardings=(parallel.param_shardings(abstract_params(CFG)), parallel.batch_sharding()))
  grad_sums, sums = grads_fn(initial_params(), make_batch())
  count = float(sums["token_count"])
  grads = jax.tree.map(lambda g: np.asarray(g) / count, grad_sums)
  return float(sums["loss_sum"]) / count, grads, {g.dtype for g in jax.tree.leaves(grad_sums)}


def assert_grads_close(actual, expected, rtol):
  """Per-param relative L2 error ||a - e|| / ||e|| <= rtol (absolute where e is all zero)."""
  for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
    scale = np.linalg.norm(e)
    error = np.linalg.norm(a - e) / (scale if scale else 1.0)
    assert error <= rtol, f"{jax.tree_util.keystr(path)}: relative error {error:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_micro_batches_give_the_full_batch_gradient(micro_batches):
  loss_1, grads_1, _ = sharded_loss_and_grads((2, 2, 2), 1)
  loss_k, grads_k, _ = sharded_loss_and_grads((2, 2, 2), micro_batches)
  np.testing.assert_allclose(loss_k, loss_1, rtol=F32_RTOL)
  assert_grads_close(grads_k, grads_1, F32_RTOL)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_every_mesh_gives_the_one_device_loss_and_gradients(mesh_shape, reference):
  """The one-device run is the optax full-logits reference (chunked vs full logits and sharded
  reductions only reorder f32 sums)."""
  loss, grads, dtypes = sharded_loss_and_grads(mesh_shape, 1)
  np.testing.assert_allclose(loss, reference["loss"], rtol=F32_RTOL)
  assert_grads_close(grads, reference["grads"], F32_RTOL)
  assert dtypes == {np.dtype(np.float32)}


def test_bf16_compute_keeps_float32_gradients(reference):
  loss, grads, dtypes = sharded_loss_and_grads((2, 2, 2), 2, "bfloat16")
  assert dtypes == {np.dtype(np.float32)}
  np.testing.assert_allclose(loss, reference["loss"], rtol=1e-2)
  assert_grads_close(grads, reference["grads"], 0.1)


def test_cft_step_updates_a_sharded_state(params, batch, reference):
  with parallel.use_mesh(mesh_of(2, 2, 2)):
    _check_cft_step_updates_a_sharded_state(params, batch, reference)


def _check_cft_step_updates_a_sharded_state(params, batch, reference):
  optim = config_lib.base_config().optim
  optim.lr, optim.schedule, optim.warmup_ratio, optim.weight_decay = 1e-3, "linear", 0.0, 0.1
  tx, schedule = make_optimizer(optim, total_steps=10)
  state = create_train_state(CFG, tx, jax.random.key(0), init_params=params)
  gate = state.params["layers"]["mlp"]["gate_kernel"]
  assert gate.dtype == jnp.float32 and gate.sharding.spec == P(None, "fsdp", "tensor")
  np.testing.assert_array_equal(np.asarray(gate), params["layers"]["mlp"]["gate_kernel"])

  step = make_cft_step(CFG, tx, micro_batches=2, chunk_size=CHUNK, schedule=schedule)
  old_params = state.params
  state, metrics = step(state, parallel.host_local_to_global(batch))
  assert jax.tree.leaves(old_params)[0].is_deleted()  # the input state was donated

  np.testing.assert_allclose(float(metrics["loss"]), reference["loss"], rtol=1e-6)
  np.testing.assert_allclose(float(metrics["accuracy"]), reference["correct"] / reference["tokens"],
                             rtol=1e-6)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(reference["grads"])),
                             rtol=1e-5)
  assert float(metrics["tokens"]) == reference["tokens"] and float(metrics["z_loss"]) == 0.0
  assert float(metrics["lr"]) == pytest.approx(float(schedule(0)))
  assert int(state.step) == 1

  # One optax update on the reference gradients, on one device.
  def reference_update(grads, params):
    return optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
  expected = jax.jit(reference_update)(reference["grads"], params)
  for (path, new), want in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                               jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(new), want, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert state.params["layers"]["mlp"]["gate_kernel"].sharding.spec == P(None, "fsdp", "tensor")
  adam_mu = state.opt_state[1][0].mu["layers"]["mlp"]["gate_kernel"]
  assert adam_mu.sharding.spec == P(None, "fsdp", "tensor")
  assert {s.data.shape for s in adam_mu.addressable_shards} == {(2, 16, 32)}
  state, metrics = step(state, parallel.host_local_to_global(batch))
  assert int(state.step) == 2 and float(metrics["lr"]) == pytest.approx(float(schedule(1)))
  assert float(metrics["loss"]) < reference["loss"]

  eval_step = make_eval_step(CFG, chunk_size=CHUNK)
  sums = eval_step(jax.device_put(params, parallel.param_shardings(abstract_params(CFG))),
                   parallel.host_local_to_global(batch))
  np.testing.assert_allclose(float(sums["loss_sum"]) / float(sums["token_count"]), reference["loss"],
                             rtol=1e-6)
  assert float(sums["correct_sum"]) == reference["correct"]


def test_create_train_state_initialises_directly_sharded():
  state = fresh_state()
  kernel = state.params["layers"]["attn"]["q_kernel"]  # [layers, embed, heads, head_dim]
  assert kernel.dtype == jnp.float32 and kernel.sharding.spec == P(None, "fsdp", "tensor", None)
  assert {s.data.shape for s in kernel.addressable_shards} == {(2, 4, 4, 8)}
  assert state.opt_state[0].nu["layers"]["attn"]["q_kernel"].sharding.spec == kernel.sharding.spec
  assert np.asarray(kernel).std() > 0.01  # really initialised
  assert int(state.step) == 0


def test_bad_init_params_and_batches_raise_clear_errors(params, batch):
  with parallel.use_mesh(mesh_of(2, 2, 2)):
    _check_bad_init_params_and_batches_raise_clear_errors(params, batch)


def _check_bad_init_params_and_batches_raise_clear_errors(params, batch):
  tx = optax.adam(1e-3)
  missing_head = {k: v for k, v in params.items() if k != "lm_head"}
  with pytest.raises(ValueError, match=r"missing \['lm_head'\] \(1 total\)"):
    create_train_state(CFG, tx, jax.random.key(0), init_params=missing_head)
  wrong_shape = params | {"lm_head": params["lm_head"][:, :32]}
  with pytest.raises(ValueError, match=r"init_params lm_head has shape \(32, 32\); the model config "
                                       r"expects \(32, 64\)"):
    create_train_state(CFG, tx, jax.random.key(0), init_params=wrong_shape)
  state = jax.eval_shape(lambda: create_train_state(CFG, tx, jax.random.key(0)))
  step = make_cft_step(CFG, tx, micro_batches=8, chunk_size=CHUNK)
  with pytest.raises(ValueError, match=r"global batch 16 must be a multiple of micro_batches \(8\) x "
                                       r"batch shards \(4"):
    step.trace(state, batch)
  without_segments = {k: v for k, v in batch.items() if k != "segment_ids"}
  with pytest.raises(ValueError, match=r"CFT batch is missing \['segment_ids'\]"):
    make_cft_step(CFG, tx, chunk_size=CHUNK).trace(state, without_segments)
