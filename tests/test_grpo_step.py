"""Tests for the sharded GRPO step: micro-batches and meshes give the full-batch update of a full-logits
reference, the kl_coef = 0 path needs no reference, repeated passes move the policy, and the update
batch's old log-probs line up with the sampler's (checked against a full forward pass, tests/full_forward.py)."""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cftjax import config as config_lib
from cftjax import parallel
from cftjax.models import Decoder, ModelConfig, init_params
from cftjax.models.decoder import token_log_probs
from cftjax.train import rollout
from cftjax.train.grpo import batch_keys, make_grpo_step, make_log_prob_fn
from cftjax.train.losses import grpo_loss
from cftjax.train.state import create_train_state
from tests.full_forward import score_completions

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
ROWS, SEQ = 16, 16
CHUNK = 40  # does not divide the token count: exercises the padded last chunk
TEMPERATURE = 0.7
LR = 1e3  # large: the SGD update dwarfs the f32 rounding of the params it is read back from


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
  """A GRPO update batch: prompts of 3..7 tokens, completions of 1..9, right padding, one empty row,
  old log-probs near the policy's (so some tokens clip) and unequal advantages."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (ROWS, SEQ + 1), dtype=np.int32)
  batch = {"completion_mask": np.zeros((ROWS, SEQ), np.float32),
           "segment_ids": np.zeros((ROWS, SEQ), np.int32)}
  for row in range(ROWS):
    prompt, completion = rng.integers(3, 8), rng.integers(1, 10)
    batch["segment_ids"][row, :prompt + completion - 1] = 1
    batch["completion_mask"][row, prompt - 1:prompt + completion - 1] = 1.0
  batch["completion_mask"][5] = 0.0
  batch["inputs"], batch["targets"] = tokens[:, :-1], tokens[:, 1:]
  batch["positions"] = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (ROWS, SEQ)).copy()
  logits = Decoder(CFG).apply({"params": PARAMS}, batch["inputs"], batch["positions"], batch["segment_ids"])
  logp = np.asarray(token_log_probs(logits, batch["targets"], TEMPERATURE))
  batch["old_logp"] = (logp + rng.normal(0, 0.3, logp.shape).astype(np.float32)) * batch["completion_mask"]
  batch["ref_logp"] = (logp + rng.normal(0, 0.5, logp.shape).astype(np.float32)) * batch["completion_mask"]
  # Per-token advantages and weights (a sequence's advantage plus per-token noise), one refined row.
  batch["advantages"] = ((rng.normal(0, 1, (ROWS, 1)) + rng.normal(0, 0.2, (ROWS, SEQ)))
                         * batch["completion_mask"]).astype(np.float32)
  batch["token_weights"] = (rng.uniform(0.5, 1.5, (ROWS, SEQ)) * batch["completion_mask"]).astype(np.float32)
  batch["refined_mask"] = np.zeros((ROWS, SEQ), np.float32)
  batch["refined_mask"][3] = batch["completion_mask"][3]
  return batch


PARAMS = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(1)))
BATCH = make_batch()


def mesh_of(data, fsdp, tensor):
  return parallel.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor},
                            jax.devices()[:data * fsdp * tensor])


def rl_section(**fields):
  """The (locked) base config's rl section with `fields` set."""
  config = config_lib.base_config()
  config.lock()
  config.rl.update(fields)
  return config.rl


def loss_config(aggregation: str, kl_coef: float = 0.0):
  return rl_section(temperature=TEMPERATURE, eps_low=0.2, eps_high=0.28, dual_clip=3.0,
                    aggregation=aggregation, max_response_len=12, kl_coef=kl_coef)


@functools.cache
def reference(aggregation: str, kl_coef: float) -> tuple[float, dict]:
  """(loss, grads) of the whole batch in one pass from full (unchunked) logits."""
  batch = {k: jnp.asarray(v) for k, v in BATCH.items()}
  cfg = loss_config(aggregation, kl_coef)

  def loss(params):
    logits = Decoder(CFG).apply({"params": params}, batch["inputs"], batch["positions"],
                                batch["segment_ids"])
    logp = token_log_probs(logits, batch["targets"], TEMPERATURE)
    sums = grpo_loss(logp, batch["old_logp"], batch["advantages"], batch["completion_mask"],
                     ref_logp=batch["ref_logp"], kl_coef=kl_coef, eps_low=cfg.eps_low,
                     eps_high=cfg.eps_high, dual_clip=cfg.dual_clip, aggregation=aggregation,
                     max_response_len=cfg.max_response_len, refined_mask=batch["refined_mask"],
                     token_weights=batch["token_weights"])
    return sums["loss_sum"] / sums["denominator"]

  value, grads = jax.jit(jax.value_and_grad(loss))(PARAMS)
  return float(value), jax.tree.map(np.asarray, grads)


@functools.cache
def sgd_step(mesh_shape, micro_batches, aggregation, kl_coef):
  """(mesh, tx, jitted step) of plain SGD; the learning rate lives in the optimizer state."""
  mesh = mesh_of(*mesh_shape)
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=LR)
  with parallel.use_mesh(mesh):
    return mesh, tx, make_grpo_step(CFG, tx, rl=loss_config(aggregation, kl_coef),
                                    micro_batches=micro_batches, chunk_size=CHUNK)


def one_sgd_step(mesh_shape, micro_batches, aggregation, kl_coef, batch=BATCH):
  """(new params as numpy, metrics) after one plain-SGD GRPO update on a mesh."""
  mesh, tx, step = sgd_step(mesh_shape, micro_batches, aggregation, kl_coef)
  with parallel.use_mesh(mesh):
    state = create_train_state(CFG, tx, jax.random.key(0), init_params=PARAMS)
    state, metrics = step(state, parallel.host_local_to_global(batch))
  return jax.tree.map(np.asarray, state.params), {k: float(v) for k, v in metrics.items()}


@functools.cache
def scorer(mesh_shape):
  mesh = mesh_of(*mesh_shape)
  with parallel.use_mesh(mesh):
    return mesh, make_log_prob_fn(CFG, chunk_size=CHUNK, temperature=TEMPERATURE)


def assert_update_is(new_params, grads, rtol):
  """new = PARAMS - LR * grads, per param to a relative L2 error of rtol in the update."""
  for (path, new), old, grad in zip(jax.tree_util.tree_flatten_with_path(new_params)[0],
                                    jax.tree.leaves(PARAMS), jax.tree.leaves(grads)):
    update, expected = old - new, LR * grad
    scale = np.linalg.norm(expected)
    error = np.linalg.norm(update - expected) / (scale if scale else 1.0)
    assert error <= rtol, f"{jax.tree_util.keystr(path)}: relative error {error:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("aggregation,kl_coef,mesh_shape,micro_batches", [
    ("token_mean", 0.1, (2, 2, 2), 4), ("seq_mean_token_mean", 0.0, (1, 1, 1), 2)])
def test_micro_batches_give_the_full_batch_update(aggregation, kl_coef, mesh_shape, micro_batches):
  loss, grads = reference(aggregation, kl_coef)
  batch = BATCH if kl_coef else {k: v for k, v in BATCH.items() if k != "ref_logp"}  # none needed
  new_params, metrics = one_sgd_step(mesh_shape, micro_batches, aggregation, kl_coef, batch)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=2e-5)
  # Chunked vs full logits and k micro-batch sums: a different f32 summation order.
  assert_update_is(new_params, grads, 1e-4)
  assert metrics["completion_tokens"] == BATCH["completion_mask"].sum()
  assert metrics["sequences"] == ROWS - 1
  assert 0 < metrics["clip_frac_low"] + metrics["clip_frac_high"] < 1
  assert ("kl" in metrics) == (kl_coef > 0)


def test_kl_coef_zero_needs_no_reference_and_kl_needs_one():
  assert "ref_logp" not in batch_keys(rl_section(kl_coef=0.0))
  assert "ref_logp" in batch_keys(rl_section(kl_coef=0.1))
  _, _, step = sgd_step((2, 2, 2), 4, "token_mean", 0.1)
  with pytest.raises(ValueError, match=r"missing \['ref_logp'\]"):
    step(None, {k: v for k, v in BATCH.items() if k != "ref_logp"})


def test_repeated_passes_keep_moving_the_policy():
  """ppo_epochs: each pass over the same batch sees a new ratio and changes the params again."""
  mesh, tx, step = sgd_step((1, 1, 1), 2, "seq_mean_token_mean", 0.0)
  with parallel.use_mesh(mesh):
    state = create_train_state(CFG, tx, jax.random.key(0), init_params=PARAMS)
    batch = parallel.host_local_to_global(BATCH)
  state.opt_state.hyperparams["learning_rate"] = jnp.asarray(1.0)  # a modest step this time
  _, score = scorer((1, 1, 1))
  batch["old_logp"], gap = score(state.params, batch)  # on-policy: ratio 1 in the first pass
  assert float(gap) > 0  # BATCH's old_logp was perturbed
  snapshots, ratios = [jax.tree.map(np.asarray, state.params)], []
  for _ in range(3):
    state, metrics = step(state, batch)
    snapshots.append(jax.tree.map(np.asarray, state.params))
    ratios.append(float(metrics["abs_log_ratio"]))
  assert ratios[0] < 1e-5 < ratios[1] < ratios[2]
  for before, after in zip(snapshots, snapshots[1:]):
    moved = sum(float(np.abs(a - b).sum()) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))
    assert moved > 0
  assert int(state.step) == 3


def test_update_batch_aligns_sampler_log_probs_with_the_trainer():
  """Samples from `generate`, builds the update batch, rescores it: the trainer's log-probs of the
  generated tokens equal the sampler's and a full (no-cache) forward pass's at each token."""
  rl = rl_section(group_size=3, max_new_tokens=6, temperature=TEMPERATURE)
  tokenizer = types.SimpleNamespace(eos_ids=(7,), pad_id=0)  # all sample_groups reads without stop_strings
  prompts = [{"prompt_ids": np.arange(1, n + 1, dtype=np.int32), "source": "s", "task": "crl",
              "record": None} for n in (3, 9, 5)]
  groups = rollout.sample_groups(PARAMS, CFG, prompts, rl, tokenizer, jax.random.key(3))
  assert [len(g.completions) for g in groups] == [3, 3, 3]
  num_rows = 10  # one extra, fully masked row
  batch = rollout.build_update_batch(groups, np.ones(9, np.float32), num_rows)
  assert batch["inputs"].shape == (num_rows, 16) and not batch["completion_mask"][9].any()
  assert batch["completion_mask"].sum() == sum(int(g.lengths.sum()) for g in groups)
  mesh, score = scorer((1, 1, 1))
  with parallel.use_mesh(mesh):
    logp, gap = score(PARAMS, parallel.host_local_to_global(batch))
  tokens = np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)
  mask = np.pad(batch["completion_mask"], ((0, 0), (1, 0)))
  reference_logp = score_completions(PARAMS, CFG, tokens, mask, TEMPERATURE)
  np.testing.assert_allclose(np.asarray(logp), reference_logp[:, 1:], atol=2e-5)
  np.testing.assert_allclose(np.asarray(logp), batch["old_logp"], atol=2e-4)
  assert float(gap) / batch["completion_mask"].sum() < 1e-4


def test_loss_presets_and_bad_objective_settings_name_the_key():
  from cftjax.train.grpo import check_loss_settings, objective  # pylint: disable=import-outside-toplevel
  assert objective(rl_section(loss="dr_grpo", advantage_scale="group_std")) == (
      "grpo", "none", "seq_mean_token_sum_norm")
  assert objective(rl_section(loss="cispo", aggregation="seq_mean_token_mean")) == (
      "cispo", "group_std", "seq_mean_token_mean")
  assert "sampler_logp" in batch_keys(rl_section(tis_cap=2.0, recompute_old_logp=True))
  for fields, match in (({"loss": "ppo"}, "rl.loss='ppo'"),
                        ({"loss": "gspo", "dual_clip": 3.0}, "rl.dual_clip"),
                        ({"tis_cap": 2.0}, "rl.tis_cap=2.0.*recompute_old_logp"),
                        ({"advantage_scale": "std"}, "rl.advantage_scale")):
    with pytest.raises(config_lib.ConfigError, match=match):
      check_loss_settings(rl_section(**fields))
