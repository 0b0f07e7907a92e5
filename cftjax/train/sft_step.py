"""The jitted, sharded CFT train step (masked cross-entropy, gradient accumulation over micro-batches,
one division by the global target-token count) and the matching eval step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import optax

from cftjax import parallel
from cftjax.models import Decoder, ModelConfig, abstract_params, lm_head_kernel
from cftjax.train import accumulation
from cftjax.train.losses import chunked_cross_entropy
from cftjax.train.state import TrainState, apply_update_if_finite, train_state_shardings

Batch = dict[str, jax.Array]  # the CFT batch: inputs, targets, loss_mask, positions, segment_ids [B, T]
BATCH_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def _cast_floats(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _compute_config(model_cfg: ModelConfig, compute_dtype) -> ModelConfig:
  return model_cfg.replace(dtype=jnp.dtype(compute_dtype or model_cfg.dtype).name)


def _check_batch(batch: Batch, micro_batches: int, mesh: Mesh, rules: parallel.LogicalRules) -> None:
  missing = [key for key in BATCH_KEYS if key not in batch]
  if missing:
    raise ValueError(f"CFT batch is missing {missing}; it needs {list(BATCH_KEYS)}")
  accumulation.check_divisible(batch["inputs"].shape[0], micro_batches, mesh, rules, "CFT batch")


def ce_sums(model_cfg: ModelConfig, params: Any, batch: Batch, *, chunk_size: int,
            z_loss_weight: float = 0.0) -> dict[str, jax.Array]:
  """Cross-entropy sums (see `chunked_cross_entropy`) of one batch; batch arrays: [batch, seq].

  params are used in their own dtype (cast them to the compute dtype first for mixed precision).
  """
  hidden = Decoder(model_cfg).apply({"params": params}, batch["inputs"], batch["positions"],
                                    batch["segment_ids"], return_hidden=True)
  return chunked_cross_entropy(hidden, lm_head_kernel(model_cfg, params), batch["targets"],
                               batch["loss_mask"], chunk_size, z_loss_weight)


def _mixed_precision_ce_sums(compute_cfg: ModelConfig, mesh: Mesh, rules: parallel.LogicalRules,
                            params: Any, batch: Batch, *, chunk_size: int,
                            z_loss_weight: float = 0.0) -> dict[str, jax.Array]:
  """ce_sums with params cast to compute_cfg.dtype and activations sharded by the rules."""
  with parallel.activation_sharding(mesh, rules):
    return ce_sums(compute_cfg, _cast_floats(params, jnp.dtype(compute_cfg.dtype)), batch,
                   chunk_size=chunk_size, z_loss_weight=z_loss_weight)


def sft_grad_sums(model_cfg: ModelConfig, params: Any, batch: Batch, mesh: Mesh,
                  rules: parallel.LogicalRules = parallel.LOGICAL_RULES, *, micro_batches: int,
                  chunk_size: int, z_loss_weight: float = 0.0,
                  compute_dtype=None) -> tuple[Any, dict[str, jax.Array]]:
  """(summed grads of loss_sum, summed CE statistics) over the global batch, micro-batch by micro-batch.

  Call under jit. params: float32 master params (cast to compute_dtype, default model_cfg.dtype,
  inside the differentiated function, so grads come back in float32). batch: the global CFT batch
  [B, T]. Divide the results by the global token count once to get the mean loss and its gradient.
  """
  _check_batch(batch, micro_batches, mesh, rules)
  compute_cfg = _compute_config(model_cfg, compute_dtype)

  def sums_fn(master_params, micro):
    return _mixed_precision_ce_sums(compute_cfg, mesh, rules, master_params, micro,
                                    chunk_size=chunk_size, z_loss_weight=z_loss_weight)

  return accumulation.accumulate_gradients(
      sums_fn, params, {key: batch[key] for key in BATCH_KEYS}, mesh, rules,
      micro_batches=micro_batches,
      grad_shardings=parallel.param_shardings(abstract_params(model_cfg), mesh, rules))


def _mean_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  count = jnp.maximum(sums["token_count"], 1.0)
  return {"loss": sums["loss_sum"] / count, "z_loss": sums["z_loss_sum"] / count,
          "accuracy": sums["correct_sum"] / count, "entropy": sums["entropy_sum"] / count,
          "tokens": sums["token_count"]}


def make_sft_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                  rules: parallel.LogicalRules = parallel.LOGICAL_RULES, *, micro_batches: int = 1,
                  chunk_size: int = 1024, z_loss_weight: float = 0.0, compute_dtype=None,
                  schedule: optax.Schedule | None = None,
                  ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted `step(state, batch) -> (state, metrics)`; the input state is donated.

  batch: the global CFT batch (global jax.Arrays from `parallel.host_local_to_global`, or numpy on
  one process), [B, T] with B a multiple of micro_batches x the batch shards. The loss is the mean
  over all target tokens of the global batch (+ z-loss); k micro-batches give the gradient of one
  full batch. Metrics (float32 scalars): loss, z_loss, accuracy, entropy (means over target tokens),
  tokens, grad_norm (global L2, before the optimizer's clipping), update_skipped (1.0 when a NaN /
  inf loss or gradient made the step skip its update: see `state.apply_update_if_finite`) and lr
  (`schedule(state.step)`, when a schedule is given).
  """
  state_shardings = train_state_shardings(model_cfg, tx, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    grad_sums, sums = sft_grad_sums(
        model_cfg, state.params, batch, mesh, rules, micro_batches=micro_batches,
        chunk_size=chunk_size, z_loss_weight=z_loss_weight, compute_dtype=compute_dtype)
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["token_count"], 1.0), grad_sums)
    metrics = _mean_metrics(sums)
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state, update_metrics = apply_update_if_finite(state, grads, metrics["loss"], tx)
    return new_state, metrics | update_metrics

  return jax.jit(step, in_shardings=(state_shardings, parallel.batch_sharding(mesh, rules)),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_eval_step(model_cfg: ModelConfig, mesh: Mesh,
                   rules: parallel.LogicalRules = parallel.LOGICAL_RULES, *, chunk_size: int = 1024,
                   compute_dtype=None) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """A jitted `eval(params, batch) -> {loss_sum, token_count, correct_sum}` (float32 sums, no z-loss)
  on a global CFT batch; sum them over eval batches and divide once."""
  param_shardings = parallel.param_shardings(abstract_params(model_cfg), mesh, rules)
  compute_cfg = _compute_config(model_cfg, compute_dtype)

  def evaluate(params: Any, batch: Batch) -> dict[str, jax.Array]:
    _check_batch(batch, 1, mesh, rules)
    sums = _mixed_precision_ce_sums(compute_cfg, mesh, rules, params, batch, chunk_size=chunk_size)
    return {key: sums[key] for key in ("loss_sum", "token_count", "correct_sum")}

  return jax.jit(evaluate, in_shardings=(param_shardings, parallel.batch_sharding(mesh, rules)),
                 out_shardings=NamedSharding(mesh, PartitionSpec()))
