"""The train state and how it changes: `TrainState` (step, float32 master copies of the trained
params, optimizer state, RNG) created on its shardings, the AdamW optimizer and lr schedule from
`config.optim`, gradient accumulation over micro-batches, and the update that is skipped when the
loss or gradients are not finite.

The trained params are the whole model, or with `ModelConfig.lora_rank` > 0 only the LoRA adapters
(`trainable_params`): the frozen base then lives outside the state (it is neither in the optimizer
nor in the checkpoints) and the steps take it as an argument (`model_params` joins the two)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import optax

from cftjax import parallel
from cftjax.config import ConfigError
from cftjax.models import ModelConfig, abstract_params, init_params as init_model_params
from cftjax.models import lora, quant

class TrainState(flax.struct.PyTreeNode):
  """step: int32 []; params: float32 master copies of the trained params (`trainable_params`);
  opt_state: `tx.init(params)`; rng: a PRNG key."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def cast_floats(tree: Any, dtype: Any) -> Any:
  """Floating-point leaves cast to `dtype`; other leaves unchanged."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def as_float32(params: Any) -> Any:
  """The float32 master copy of params."""
  return cast_floats(params, jnp.float32)


def trainable_params(model_cfg: ModelConfig, params: Any) -> Any:
  """The part of a model's param tree (plain or boxed) that training updates: the LoRA adapters (and
  model_cfg.lora_modules_to_save) with model_cfg.lora_rank > 0, else all of it."""
  return lora.split(params, model_cfg.lora_modules_to_save)[1] if model_cfg.lora_rank else params


def frozen_shardings(model_cfg: ModelConfig) -> Any:
  """Shardings of the frozen base of a LoRA model (its quantized kernels and scales included), by the
  logical rules; None without LoRA. A 4-bit base whose packed kernels would not shard like the float
  ones raises ValueError (`lora.check_packed_shardings`)."""
  if not model_cfg.lora_rank:
    return None
  shardings = parallel.param_shardings(lora.split(abstract_params(model_cfg))[0])
  if model_cfg.quantize_base in quant.LEVELS:
    float_cfg = model_cfg.replace(quantize_base="none")
    lora.check_packed_shardings(model_cfg, parallel.param_shardings(lora.split(abstract_params(float_cfg))[0]),
                                shardings)
  return shardings


def abstract_frozen_base(model_cfg: ModelConfig) -> Any:
  """ShapeDtypeStructs of a LoRA model's frozen base on `frozen_shardings` (an ahead-of-time
  compile's argument); None without LoRA."""
  if not model_cfg.lora_rank:
    return None
  return parallel.with_shardings(lora.split(nn.unbox(abstract_params(model_cfg)))[0], frozen_shardings(model_cfg))


def model_params(trained: Any, frozen: Any) -> Any:
  """The model's whole param tree: the trained params, joined with the frozen base when there is one."""
  return trained if frozen is None else lora.combine(frozen, trained)


def frozen_optional(jitted: Any) -> Callable[..., Any]:
  """A jitted `step(state, batch, frozen)` callable as `step(state, batch)` when there is no frozen
  base (a full fine-tune); `.trace(...)` and `.lower(...)` (ahead-of-time compilation) take the same
  arguments."""
  call = lambda state, batch, frozen=None: jitted(state, batch, frozen)
  call.trace = lambda state, batch, frozen=None: jitted.trace(state, batch, frozen)
  call.lower = lambda state, batch, frozen=None: jitted.lower(state, batch, frozen)
  return call


def dropout_rng(model_cfg: ModelConfig, state: TrainState) -> jax.Array | None:
  """The key of this step's LoRA dropout (model_cfg.lora_dropout > 0), else None."""
  return jax.random.fold_in(state.rng, state.step) if model_cfg.lora_dropout else None


def abstract_master_params(model_cfg: ModelConfig) -> Any:
  """ShapeDtypeStructs of the unboxed float32 master copies of the trained params."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                      nn.unbox(trainable_params(model_cfg, abstract_params(model_cfg))))


def grad_shardings(model_cfg: ModelConfig) -> Any:
  """Shardings of the gradients (and master copies) of the trained params."""
  return parallel.param_shardings(trainable_params(model_cfg, abstract_params(model_cfg)))


def train_state_shardings(model_cfg: ModelConfig, tx: optax.GradientTransformation) -> TrainState:
  """A TrainState of NamedShardings: params and every optimizer-state leaf that mirrors a param by
  the param's logical names (traced through `tx.init` on boxed params), the rest replicated."""
  boxed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                       trainable_params(model_cfg, abstract_params(model_cfg)))
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=boxed,
                      opt_state=jax.eval_shape(tx.init, boxed),
                      rng=jax.eval_shape(lambda key: jax.random.split(key)[1], jax.random.PRNGKey(0)))
  return parallel.param_shardings(shapes)


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
                       init_params: Any = None, frozen: Any = None) -> TrainState:
  """A TrainState whose params and optimizer state are created directly in their shardings.

  init_params None: fresh params from `rng` (initialised inside one jit with sharded outputs, so no
  device ever holds the whole model; a LoRA model's fresh adapters are drawn from the same key as
  its fresh base, `checkpoint_io.fresh_base_params`; its model_cfg.lora_modules_to_save start as
  copies of the frozen base's, `frozen`). Otherwise the given unboxed trained params (numpy or jax
  arrays, e.g. from `cftjax.models.load_hf`; every process passes the same values) are placed onto
  the shardings and cast to float32. The state keeps a key split from `rng` for later sampling.
  """
  shardings = train_state_shardings(model_cfg, tx)
  params_rng, state_rng = jax.random.split(rng)

  def new_state(params, state_rng):
    params = as_float32(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng)

  if init_params is None:
    saved = {p: frozen[p] for p in lora.saved_params(model_cfg.lora_modules_to_save)}
    fresh = lambda r, saved: {**trainable_params(model_cfg, init_model_params(model_cfg, r)), **saved}
    return jax.jit(lambda r, s, saved: new_state(fresh(r, saved), s),
                   out_shardings=shardings)(params_rng, state_rng, saved)
  _check_same_structure(init_params, abstract_master_params(model_cfg))
  placed = jax.device_put(init_params, shardings.params)
  return jax.jit(new_state, out_shardings=shardings)(placed, state_rng)


def abstract_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int
                         ) -> TrainState:
  """The TrainState of ShapeDtypeStructs carrying their target shardings (a restore target)."""
  params = abstract_master_params(model_cfg)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=jax.eval_shape(tx.init, params),
                      rng=jax.eval_shape(lambda key: jax.random.split(key)[1], jax.random.PRNGKey(seed)))
  return parallel.with_shardings(shapes, train_state_shardings(model_cfg, tx))


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


# ------------------------------------------------------------------------------------------------
# The optimizer.

SCHEDULES = ("cosine", "linear", "constant")


def _path_names(path) -> list[str]:
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)).lower())
        break
  return names


def decay_mask(params, decay_embeddings: bool = True):
  """Pytree of bools like params: True where weight decay applies.

  No decay for a leaf whose path has a component containing "norm" or "bias", whose last name is
  "scale" (RMSNorm gains), or, when decay_embeddings is False, a component containing "embed".
  """

  def decays(path, _) -> bool:
    names = _path_names(path)
    if any("norm" in name or "bias" in name for name in names):
      return False
    if names and names[-1] == "scale":
      return False
    return decay_embeddings or not any("embed" in name for name in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def check_optim(optim: Any) -> None:
  """Raises a ConfigError naming the `optim` key whose value cannot be used."""
  if optim.lr is None or optim.lr < 0:
    raise ConfigError(f"optim.lr={optim.lr!r}: set --config.optim.lr to a learning rate >= 0")
  if optim.schedule not in SCHEDULES:
    raise ConfigError(f"optim.schedule={optim.schedule!r} is not one of {SCHEDULES}")
  if optim.warmup_steps and optim.warmup_ratio:
    raise ConfigError(f"optim.warmup_steps={optim.warmup_steps} and optim.warmup_ratio="
                      f"{optim.warmup_ratio} are both set; set only one (e.g. "
                      "--config.optim.warmup_ratio=0 to use warmup_steps)")
  if not 0.0 <= optim.min_lr_ratio <= 1.0:
    raise ConfigError(f"optim.min_lr_ratio={optim.min_lr_ratio} must be in [0, 1]")


def make_schedule(optim: Any, total_steps: int) -> Callable[[Any], Any]:
  """lr(step) of the `optim` section: linear warmup 0 -> lr over the warmup steps (HF convention:
  lr * step / warmup), then cosine or linear decay to lr * min_lr_ratio at total_steps, or constant."""
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  lr = optim.lr
  warmup_steps = int(optim.warmup_steps or math.ceil(optim.warmup_ratio * total_steps))
  decay_steps = total_steps - warmup_steps
  if decay_steps < 1 and optim.schedule != "constant":
    raise ConfigError(f"optim warmup ({warmup_steps} steps) must be shorter than the {total_steps} "
                      "total steps; lower optim.warmup_steps / optim.warmup_ratio")
  if optim.schedule == "cosine":
    after_warmup = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim.min_lr_ratio)
  elif optim.schedule == "linear":
    after_warmup = optax.linear_schedule(lr, lr * optim.min_lr_ratio, decay_steps)
  else:
    after_warmup = optax.constant_schedule(lr)
  if not warmup_steps:
    return after_warmup
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, after_warmup], [warmup_steps])


def make_optimizer(optim: Any, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """(AdamW with optional global-norm clipping, lr schedule) of the config's `optim` section
  (`cftjax.config.base_config`: lr, schedule, warmup_steps | warmup_ratio, min_lr_ratio, b1, b2,
  eps, weight_decay, grad_clip_norm (0: no clipping), decay_embeddings)."""
  check_optim(optim)
  schedule = make_schedule(optim, total_steps)
  adamw = optax.adamw(
      schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
      mask=lambda params: decay_mask(params, optim.decay_embeddings))
  if not optim.grad_clip_norm:
    return adamw, schedule
  return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw), schedule


# ------------------------------------------------------------------------------------------------
# Gradient accumulation.

# sums_fn(params, micro_batch, rng) -> {"loss_sum": scalar, ...float32 scalars}; keys ending in "_min" /
# "_max" are combined over micro-batches by min / max, all others by addition. rng: a key of its own
# per micro-batch (for dropout), or None.
SumsFn = Callable[[Any, dict[str, jax.Array], jax.Array | None], dict[str, jax.Array]]


def split_micro_batches(batch: Mapping[str, jax.Array], micro_batches: int) -> dict[str, jax.Array]:
  """Each [B, ...] array -> [micro_batches, B / micro_batches, ...]; micro-batch j holds rows j, j + k,
  j + 2k, ... so every device keeps its own rows (no resharding) and feeds each micro-batch equally."""
  mesh = parallel.current()[0]
  batch_axes = parallel.batch_sharding().spec[0]

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


def accumulate_gradients(sums_fn: SumsFn, params: Any, batch: Mapping[str, jax.Array], *,
                         micro_batches: int, grad_shardings: Any, rng: jax.Array | None = None,
                         unroll: bool = False
                         ) -> tuple[Any, dict[str, jax.Array]]:
  """(summed grads of sums_fn's loss_sum, combined statistics) over the micro-batches of `batch`.

  Call under jit. params: float32 master params (grads come back float32 in `grad_shardings`).
  batch: global arrays [B, ...], B a multiple of micro_batches x batch shards. Divide by a GLOBAL
  count once afterwards: the result then equals one pass over the full batch. rng: split into one key
  per micro-batch for sums_fn (None: sums_fn gets None). `unroll` writes the micro-batch loop out as
  straight-line code (`ModelConfig.unroll_loops`).
  """
  def loss_sum(master_params, micro, micro_rng):
    sums = sums_fn(master_params, micro, micro_rng)
    return sums["loss_sum"], sums

  def add_micro_batch(carry, xs):
    grads, sums = carry
    micro, micro_rng = xs
    micro_grads, micro_sums = jax.grad(loss_sum, has_aux=True)(params, micro, micro_rng)
    grads = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, grads, micro_grads), grad_shardings)
    return (grads, combine_sums(sums, micro_sums)), None

  micro = split_micro_batches(batch, micro_batches)
  rngs = None if rng is None else jax.random.split(rng, micro_batches)
  first = jax.tree.map(lambda x: x[0], (micro, rngs))
  sums_shape = jax.eval_shape(loss_sum, params, *first)[1]
  zero_grads = jax.lax.with_sharding_constraint(
      jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), grad_shardings)
  (grads, sums), _ = jax.lax.scan(add_micro_batch, (zero_grads, _identity_sums(sums_shape)), (micro, rngs),
                                  unroll=micro_batches if unroll else 1)
  return grads, sums
