"""The jitted, sharded GRPO update step (clipped surrogate + optional KL, micro-batch accumulation,
one division by the GLOBAL loss normaliser) and the jitted completion log-prob scorer."""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import optax

from cftjax import parallel
from cftjax.models import Decoder, ModelConfig, abstract_params, lm_head_kernel
from cftjax.train import accumulation
from cftjax.train.losses import AGGREGATION_MODES, KL_KINDS, chunked_token_log_probs, grpo_loss
from cftjax.train.sft_step import _cast_floats, _compute_config
from cftjax.train.state import TrainState, apply_update_if_finite, train_state_shardings

# The GRPO update batch (see cftjax.train.rollout.build_update_batch); all [B, T] unless noted:
# inputs, targets (int32), positions, segment_ids (int32, 0 = padding), completion_mask (float32,
# 1 on generated target tokens), old_logp (float32, aligned to targets), advantages [B] (float32),
# and ref_logp (float32) when the KL term is on.
Batch = dict[str, jax.Array]
SCORE_KEYS = ("inputs", "targets", "positions", "segment_ids", "completion_mask")
UPDATE_KEYS = SCORE_KEYS + ("old_logp", "advantages")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """The GRPO objective's settings (see `cftjax.train.losses.grpo_loss`).

  temperature: the sampling temperature; log-probs are taken of softmax(logits / temperature).
  eps_low / eps_high: PPO clip range (None: unclipped side); dual_clip: c > 1 or None.
  aggregation: token_mean | seq_mean_token_mean | seq_mean_token_sum_norm, normalised over the
  GLOBAL batch; max_response_len: the Dr. GRPO constant (None: the batch's sequence length).
  kl_coef: weight of the KL(policy || reference) penalty of kind kl_kind (k1 | k3); 0 = no reference.
  """

  temperature: float = 1.0
  eps_low: float | None = 0.2
  eps_high: float | None = 0.2
  dual_clip: float | None = None
  log_ratio_clamp: float | None = 20.0
  aggregation: str = "token_mean"
  max_response_len: int | None = None
  kl_coef: float = 0.0
  kl_kind: str = "k3"

  def __post_init__(self):
    if self.aggregation not in AGGREGATION_MODES:
      raise ValueError(f"rl.aggregation={self.aggregation!r} is not one of {AGGREGATION_MODES}")
    if self.kl_kind not in KL_KINDS:
      raise ValueError(f"rl.kl_kind={self.kl_kind!r} is not one of {KL_KINDS}")
    if self.kl_coef < 0:
      raise ValueError(f"rl.kl_coef={self.kl_coef} must be >= 0 (0 turns the reference model off)")
    if self.temperature <= 0:
      raise ValueError(f"rl.temperature={self.temperature}: log-probs need a positive temperature")

  @property
  def uses_reference(self) -> bool:
    return self.kl_coef > 0

  def batch_keys(self) -> tuple[str, ...]:
    return UPDATE_KEYS + (("ref_logp",) if self.uses_reference else ())


def _select_keys(jitted: Callable, keys: tuple[str, ...], what: str) -> Callable:
  """`jitted(first, batch)` called with exactly `keys` of batch (other keys ignored; missing raise)."""
  def call(first: Any, batch: Batch):
    missing = [key for key in keys if key not in batch]
    if missing:
      raise ValueError(f"{what} batch is missing {missing}; it needs {list(keys)} "
                       "(build it with cftjax.train.rollout.build_update_batch)")
    return jitted(first, {key: batch[key] for key in keys})

  return call


def completion_log_probs(model_cfg: ModelConfig, params: Any, batch: Batch, *, chunk_size: int,
                         temperature: float) -> tuple[jax.Array, jax.Array]:
  """(log p(target) [B, T], entropy [B, T]) of softmax(logits / temperature), float32, chunked.

  params are used in their own dtype (cast them to the compute dtype first for mixed precision).
  """
  hidden = Decoder(model_cfg).apply({"params": params}, batch["inputs"], batch["positions"],
                                    batch["segment_ids"], return_hidden=True)
  return chunked_token_log_probs(hidden, lm_head_kernel(model_cfg, params), batch["targets"],
                                 chunk_size, temperature)


def grpo_sums(model_cfg: ModelConfig, params: Any, batch: Batch, loss_cfg: PolicyLossConfig, *,
              chunk_size: int) -> dict[str, jax.Array]:
  """`grpo_loss` sums of one (micro-)batch plus entropy_sum (masked) and seq_count."""
  logp, entropy = completion_log_probs(model_cfg, params, batch, chunk_size=chunk_size,
                                       temperature=loss_cfg.temperature)
  mask = batch["completion_mask"].astype(jnp.float32)
  sums = grpo_loss(logp, batch["old_logp"], batch["advantages"], mask,
                   ref_logp=batch.get("ref_logp"), kl_coef=loss_cfg.kl_coef, kl_kind=loss_cfg.kl_kind,
                   eps_low=loss_cfg.eps_low, eps_high=loss_cfg.eps_high, dual_clip=loss_cfg.dual_clip,
                   log_ratio_clamp=loss_cfg.log_ratio_clamp, aggregation=loss_cfg.aggregation,
                   max_response_len=loss_cfg.max_response_len)
  return sums | {"entropy_sum": jnp.sum(mask * jax.lax.stop_gradient(entropy)),
                 "seq_count": jnp.sum(jnp.sum(mask, axis=1) > 0).astype(jnp.float32)}


def _mean_metrics(sums: dict[str, jax.Array], uses_reference: bool) -> dict[str, jax.Array]:
  tokens = jnp.maximum(sums["token_count"], 1.0)
  denominator = jnp.maximum(sums["denominator"], 1e-9)
  metrics = {
      "loss": sums["loss_sum"] / denominator, "pg_loss": sums["pg_loss_sum"] / denominator,
      "entropy": sums["entropy_sum"] / tokens, "clip_frac_low": sums["clip_low_sum"] / tokens,
      "clip_frac_high": sums["clip_high_sum"] / tokens, "dual_clip_frac": sums["dual_clip_sum"] / tokens,
      "ratio_mean": sums["ratio_sum"] / tokens, "ratio_min": sums["ratio_min"],
      "ratio_max": sums["ratio_max"], "abs_log_ratio": sums["abs_log_ratio_sum"] / tokens,
      "completion_tokens": sums["token_count"], "sequences": sums["seq_count"]}
  if uses_reference:
    metrics |= {"kl": sums["kl_sum"] / tokens, "kl_loss": sums["kl_loss_sum"] / denominator}
  return metrics


def _batch_shardings(mesh: Mesh, rules: parallel.LogicalRules, keys: tuple[str, ...]
                     ) -> dict[str, NamedSharding]:
  return {key: parallel.batch_sharding(mesh, rules, 1 if key == "advantages" else 2) for key in keys}


def make_grpo_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                   rules: parallel.LogicalRules = parallel.LOGICAL_RULES, *,
                   loss_cfg: PolicyLossConfig, micro_batches: int = 1, chunk_size: int = 1024,
                   compute_dtype=None, schedule: optax.Schedule | None = None,
                   ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted `step(state, batch) -> (state, metrics)`: one optimizer update; the state is donated.

  batch: the global update batch (`loss_cfg.batch_keys()`; global jax.Arrays from
  `parallel.host_local_to_global`, or numpy on one process), B a multiple of micro_batches x the
  batch shards. The loss is sum(numerators) / sum(denominators) over the WHOLE batch, so k
  micro-batches give the gradient of one full batch. Metrics (float32 scalars): loss, pg_loss,
  entropy, clip_frac_low / high, dual_clip_frac, ratio_mean / min / max, abs_log_ratio (mean
  |logp - old_logp|), kl and kl_loss (with a reference), completion_tokens, sequences, grad_norm
  (before the optimizer's clipping), update_skipped (1.0 when a NaN / inf loss or gradient made the
  step skip its update: see `state.apply_update_if_finite`) and lr (when a schedule is given).
  """
  state_shardings = train_state_shardings(model_cfg, tx, mesh, rules)
  grad_shardings = parallel.param_shardings(abstract_params(model_cfg), mesh, rules)
  compute_cfg = _compute_config(model_cfg, compute_dtype)
  keys = loss_cfg.batch_keys()

  def sums_fn(master_params, micro):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return grpo_sums(compute_cfg, _cast_floats(master_params, jnp.dtype(compute_cfg.dtype)), micro,
                       loss_cfg, chunk_size=chunk_size)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    accumulation.check_divisible(batch["inputs"].shape[0], micro_batches, mesh, rules, "GRPO update")
    grad_sums, sums = accumulation.accumulate_gradients(
        sums_fn, state.params, batch, mesh, rules, micro_batches=micro_batches,
        grad_shardings=grad_shardings)
    denominator = sums["denominator"]
    grads = jax.tree.map(lambda g: jnp.where(denominator > 0, g / jnp.maximum(denominator, 1e-9), 0.0),
                         grad_sums)
    metrics = _mean_metrics(sums, loss_cfg.uses_reference)
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state, update_metrics = apply_update_if_finite(state, grads, metrics["loss"], tx)
    return new_state, metrics | update_metrics

  return _select_keys(jax.jit(step, in_shardings=(state_shardings, _batch_shardings(mesh, rules, keys)),
                              out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
                              donate_argnums=0), keys, "GRPO update")


def make_log_prob_fn(model_cfg: ModelConfig, mesh: Mesh,
                     rules: parallel.LogicalRules = parallel.LOGICAL_RULES, *, chunk_size: int = 1024,
                     compute_dtype=None, temperature: float = 1.0
                     ) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
  """A jitted `score(params, batch) -> (logp [B, T], abs_gap_sum [])` for the policy or reference.

  logp: float32 log-probs of the targets at `temperature`, zero off the completion mask (the old or
  reference log-probs of an update batch). abs_gap_sum: sum over completion tokens of
  |logp - batch["old_logp"]| (the sampler-vs-trainer gap when old_logp holds the sampler's).
  """
  param_shardings = parallel.param_shardings(abstract_params(model_cfg), mesh, rules)
  compute_cfg = _compute_config(model_cfg, compute_dtype)
  keys = SCORE_KEYS + ("old_logp",)

  def score(params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      logp, _ = completion_log_probs(compute_cfg, _cast_floats(params, jnp.dtype(compute_cfg.dtype)),
                                     batch, chunk_size=chunk_size, temperature=temperature)
    mask = batch["completion_mask"] > 0
    logp = jnp.where(mask, logp, 0.0)
    return logp, jnp.sum(jnp.where(mask, jnp.abs(logp - batch["old_logp"]), 0.0))

  return _select_keys(jax.jit(score, in_shardings=(param_shardings, _batch_shardings(mesh, rules, keys)),
                              out_shardings=(parallel.batch_sharding(mesh, rules),
                                             NamedSharding(mesh, PartitionSpec()))),
                      keys, "log-prob scoring")
