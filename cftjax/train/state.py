"""`TrainState` (step, float32 master params, optimizer state, RNG) and its sharded creation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import optax

from cftjax import parallel
from cftjax.models import ModelConfig, abstract_params, init_params as init_model_params


class TrainState(flax.struct.PyTreeNode):
  """step: int32 []; params: float32 master params; opt_state: `tx.init(params)`; rng: a PRNG key."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def as_float32(params: Any) -> Any:
  """Floating-point leaves cast to float32 (the master copy); other leaves unchanged."""
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def abstract_master_params(model_cfg: ModelConfig) -> Any:
  """ShapeDtypeStructs of the unboxed float32 master params."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                      nn.unbox(abstract_params(model_cfg)))


def train_state_shardings(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                          rules: parallel.LogicalRules = parallel.LOGICAL_RULES) -> TrainState:
  """A TrainState of NamedShardings: params and optimizer state by the logical rules, the step and
  RNG replicated."""
  param_shardings = parallel.param_shardings(abstract_params(model_cfg), mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  return TrainState(
      step=replicated,
      params=param_shardings,
      opt_state=parallel.optimizer_state_shardings(tx, param_shardings,
                                                   abstract_master_params(model_cfg)),
      rng=replicated)


def _check_same_structure(given: Any, expected: Any) -> None:
  """Raises naming the missing, unexpected or misshapen params of `given`."""
  given_shapes = {parallel.path_name(p): tuple(x.shape)
                  for p, x in jax.tree_util.tree_flatten_with_path(given)[0]}
  expected_shapes = {parallel.path_name(p): tuple(x.shape)
                     for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
  missing = sorted(set(expected_shapes) - set(given_shapes))
  extra = sorted(set(given_shapes) - set(expected_shapes))
  if missing or extra:
    raise ValueError(f"init_params do not match the model config: missing {missing[:5]} "
                     f"({len(missing)} total), unexpected {extra[:5]} ({len(extra)} total); "
                     "load them with the same ModelConfig")
  for name, shape in given_shapes.items():
    if shape != expected_shapes[name]:
      raise ValueError(f"init_params {name} has shape {shape}; the model config expects "
                       f"{expected_shapes[name]}")


def create_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array,
                       mesh: Mesh, rules: parallel.LogicalRules = parallel.LOGICAL_RULES,
                       init_params: Any = None) -> TrainState:
  """A TrainState whose params and optimizer state are created directly in their shardings.

  init_params None: fresh params from `rng` (initialised inside one jit with sharded outputs, so no
  device ever holds the whole model). Otherwise the given unboxed params (numpy or jax arrays, e.g.
  from `cftjax.models.load_hf`; every process passes the same values) are placed onto the shardings
  and cast to float32. The state keeps a key split from `rng` for later sampling.
  """
  shardings = train_state_shardings(model_cfg, tx, mesh, rules)
  params_rng, state_rng = jax.random.split(rng)

  def new_state(params, state_rng):
    params = as_float32(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng)

  if init_params is None:
    return jax.jit(lambda r, s: new_state(init_model_params(model_cfg, r), s),
                   out_shardings=shardings)(params_rng, state_rng)
  _check_same_structure(init_params, abstract_master_params(model_cfg))
  placed = jax.device_put(init_params, shardings.params)
  return jax.jit(new_state, out_shardings=shardings)(placed, state_rng)


def apply_update_if_finite(state: TrainState, grads: Any, loss: jax.Array,
                           tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
  """(state after one `tx` update with `grads`, {"grad_norm", "update_skipped"}); call under jit.

  When `loss` or any gradient is NaN or infinite (the gradients' global norm is then not finite),
  the update is skipped inside the jitted step: params and optimizer state (Adam moments and the
  optimizer's own count, which drives the lr schedule) come back unchanged. `state.step` advances
  either way: it counts the batches consumed (the data position, checkpoint and log step numbers).
  update_skipped: float32 1.0 for a skipped update, else 0.0; grad_norm: the global L2 norm.
  """
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep_if_bad = lambda new, old: jnp.where(finite, new, old)
  new_state = state.replace(step=state.step + 1,
                            params=jax.tree.map(keep_if_bad, params, state.params),
                            opt_state=jax.tree.map(keep_if_bad, opt_state, state.opt_state))
  return new_state, {"grad_norm": grad_norm, "update_skipped": (~finite).astype(jnp.float32)}
