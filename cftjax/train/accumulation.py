"""Gradient accumulation shared by the train steps: a global batch split into micro-batches that keep
each device's rows, and one scan summing a loss's gradients and statistics over them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cftjax import parallel

# sums_fn(params, micro_batch) -> {"loss_sum": scalar, ...float32 scalars}; keys ending in "_min" /
# "_max" are combined over micro-batches by min / max, all others by addition.
SumsFn = Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]


def check_divisible(global_batch: int, micro_batches: int, mesh: Mesh, rules: parallel.LogicalRules,
                    what: str) -> None:
  """Raises unless `global_batch` rows split evenly into micro_batches x the batch shards."""
  shards = parallel.batch_shard_count(mesh, rules)
  if micro_batches < 1 or global_batch % (micro_batches * shards):
    raise ValueError(f"{what}: global batch {global_batch} must be a multiple of micro_batches "
                     f"({micro_batches}) x batch shards ({shards}: mesh axes "
                     f"{parallel.batch_sharding(mesh, rules).spec[0]}); change the batch size, the "
                     "micro-batch count or the mesh")


def split_micro_batches(batch: Mapping[str, jax.Array], micro_batches: int, mesh: Mesh,
                        rules: parallel.LogicalRules) -> dict[str, jax.Array]:
  """Each [B, ...] array -> [micro_batches, B / micro_batches, ...]; micro-batch j holds rows j, j + k,
  j + 2k, ... so every device keeps its own rows (no resharding) and feeds each micro-batch equally."""
  batch_axes = parallel.batch_sharding(mesh, rules).spec[0]

  def split(x):  # x: [B, ...]
    x = jnp.swapaxes(x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]), 0, 1)
    spec = PartitionSpec(None, batch_axes, *(None,) * (x.ndim - 2))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  return {key: split(value) for key, value in batch.items()}


def combine_sums(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Statistics of two micro-batches combined: min / max for "*_min" / "*_max" keys, else a + b."""
  def combine(key):
    if key.endswith("_min"):
      return jnp.minimum(a[key], b[key])
    if key.endswith("_max"):
      return jnp.maximum(a[key], b[key])
    return a[key] + b[key]

  return {key: combine(key) for key in a}


def _identity_sums(shapes: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """The neutral element of `combine_sums`: +inf for "*_min", -inf for "*_max", else zeros."""
  def neutral(key, shape):
    fill = jnp.inf if key.endswith("_min") else -jnp.inf if key.endswith("_max") else 0.0
    return jnp.full(shape.shape, fill, shape.dtype)

  return {key: neutral(key, shape) for key, shape in shapes.items()}


def accumulate_gradients(sums_fn: SumsFn, params: Any, batch: Mapping[str, jax.Array], mesh: Mesh,
                         rules: parallel.LogicalRules, *, micro_batches: int, grad_shardings: Any
                         ) -> tuple[Any, dict[str, jax.Array]]:
  """(summed grads of sums_fn's loss_sum, combined statistics) over the micro-batches of `batch`.

  Call under jit. params: float32 master params (grads come back float32 in `grad_shardings`).
  batch: global arrays [B, ...], B a multiple of micro_batches x batch shards. Divide by a GLOBAL
  count once afterwards: the result then equals one pass over the full batch.
  """
  def loss_sum(master_params, micro):
    sums = sums_fn(master_params, micro)
    return sums["loss_sum"], sums

  def add_micro_batch(carry, micro):
    grads, sums = carry
    micro_grads, micro_sums = jax.grad(loss_sum, has_aux=True)(params, micro)
    grads = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, grads, micro_grads), grad_shardings)
    return (grads, combine_sums(sums, micro_sums)), None

  micro = split_micro_batches(batch, micro_batches, mesh, rules)
  sums_shape = jax.eval_shape(loss_sum, params, jax.tree.map(lambda x: x[0], micro))[1]
  zero_grads = jax.lax.with_sharding_constraint(
      jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), grad_shardings)
  (grads, sums), _ = jax.lax.scan(add_micro_batch, (zero_grads, _identity_sums(sums_shape)), micro)
  return grads, sums
