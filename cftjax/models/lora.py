"""Low-rank adapters (LoRA, Hu et al. 2021) on the decoder's projections, and the frozen base stored in
int8 (QLoRA-style), as a transform of the decoder's param specs and layer weights.

With `ModelConfig.lora_rank` r > 0, every targeted kernel W [in..., out...] of a layer gets an adapter
{"a": [in..., r], "b": [r, out...]} next to it (`attn/q_lora`, `mlp/down_lora`, ...), stacked on the
layers axis like W. A projection computes x W + (alpha / r) (x A) B: the adapters are never merged
into W while training or sampling (`add_delta`, called by every weight layout of
`cftjax.models.attention`). A is drawn as PEFT draws it (kaiming-uniform with a = sqrt(5):
U(-1/sqrt(fan_in), 1/sqrt(fan_in))), B is zero, so an untrained adapter changes nothing. Adapters
carry logical axis names (the kernel's input axes, "lora_rank", the kernel's output axes), so they
shard by the same rules as their kernel (`cftjax.parallel.LOGICAL_RULES`; "lora_rank" is
replicated). Dropout (`lora_dropout`) drops the adapter's input while training.

With `ModelConfig.quantize_base="int8"` the targeted kernels are stored as int8 with one float scale
per output channel (symmetric absmax; `quantize`) and dequantized to the compute dtype layer by layer
inside the scanned block (`prepare_layer`).

A param tree splits into the frozen base and the trainable adapters (`split`) and back (`combine`);
`merge` folds the adapters into the kernels (the export of a LoRA run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Target:
  """A projection LoRA can adapt: its param group and kernel in a layer, how many leading kernel axes
  are inputs, and the module name of the same projection in a Hugging Face layer."""

  group: str
  kernel: str
  in_dims: int
  hf_module: str


TARGETS = {
    "q": Target("attn", "q_kernel", 1, "self_attn.q_proj"),
    "k": Target("attn", "k_kernel", 1, "self_attn.k_proj"),
    "v": Target("attn", "v_kernel", 1, "self_attn.v_proj"),
    "o": Target("attn", "o_kernel", 2, "self_attn.o_proj"),
    "gate": Target("mlp", "gate_kernel", 1, "mlp.gate_proj"),
    "up": Target("mlp", "up_kernel", 1, "mlp.up_proj"),
    "down": Target("mlp", "down_kernel", 1, "mlp.down_proj"),
}
QUANTIZATIONS = ("none", "int8")
ADAPTER_SUFFIX = "_lora"  # attn/q_lora holds the adapter of attn/q_kernel
SCALE_SUFFIX = "_scale"  # attn/q_kernel_scale holds the int8 q_kernel's per-channel scales
RANK_AXIS = "lora_rank"


def adapter_name(target: str) -> str:
  return target + ADAPTER_SUFFIX


def check_settings(rank: int, alpha: float, dropout: float, targets: tuple[str, ...],
                   quantize_base: str) -> None:
  """Raises ValueError naming the setting (model.lora.<key>) that cannot be used."""
  if rank < 0:
    raise ValueError(f"model.lora.rank={rank} must be >= 0 (0 turns LoRA off)")
  if not rank:
    if quantize_base != "none":
      raise ValueError(f"model.lora.quantize_base={quantize_base!r} needs adapters to train: set "
                       "model.lora.rank > 0")
    return
  if alpha <= 0:
    raise ValueError(f"model.lora.alpha={alpha} must be > 0")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"model.lora.dropout={dropout} must be in [0, 1)")
  unknown = [t for t in targets if t not in TARGETS]
  if unknown or not targets:
    raise ValueError(f"model.lora.targets={tuple(targets)}: name one or more of {tuple(TARGETS)}")
  if quantize_base not in QUANTIZATIONS:
    raise ValueError(f"model.lora.quantize_base={quantize_base!r} is not one of {QUANTIZATIONS}")


# ------------------------------------------------------------------------------------------------
# Specs: what the decoder declares.


def _init_a(fan_in_axes: tuple[int, ...]):
  """PEFT's kaiming_uniform_(a=sqrt(5)) of lora_A: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=fan_in_axes,
                                          out_axis=-1)


def extend_layer_specs(cfg: Any, specs: dict[str, Any]) -> dict[str, Any]:
  """One layer's param specs ({group: {name: (shape, axes, init[, dtype])}}) with the adapters of
  cfg.lora_targets and, with cfg.quantize_base="int8", the targeted kernels as int8 plus scales."""
  if not cfg.lora_rank:
    return specs
  specs = {name: dict(group) if isinstance(group, Mapping) else group for name, group in specs.items()}
  r = cfg.lora_rank
  for name in cfg.lora_targets:
    target = TARGETS[name]
    group = specs[target.group]
    shape, axes = group[target.kernel][:2]
    n = target.in_dims
    group[adapter_name(name)] = {
        "a": (shape[:n] + (r,), axes[:n] + (RANK_AXIS,), _init_a(tuple(range(n)))),
        "b": ((r,) + shape[n:], (RANK_AXIS,) + axes[n:], nn.initializers.zeros),
    }
    if cfg.quantize_base == "int8":
      group[target.kernel] = (shape, axes, nn.initializers.zeros, jnp.int8)  # filled by quantize_base
      group[target.kernel + SCALE_SUFFIX] = (shape[n:], axes[n:], nn.initializers.ones)
  return specs


# ------------------------------------------------------------------------------------------------
# Applying adapters.


def prepare_layer(cfg: Any, layer: dict[str, Any], dtype: Any, dropout_rng: Array | None = None
                  ) -> dict[str, Any]:
  """One layer's weights as the block's layouts use them: int8 kernels dequantized to `dtype` (their
  scales dropped), each adapter's B scaled by alpha / rank, and with `dropout_rng` (training with
  cfg.lora_dropout > 0) a key per adapter for dropping its input."""
  if not cfg.lora_rank:
    return layer
  layer = {name: dict(group) if isinstance(group, Mapping) else group for name, group in layer.items()}
  scaling = cfg.lora_alpha / cfg.lora_rank
  for i, name in enumerate(cfg.lora_targets):
    target = TARGETS[name]
    group = layer[target.group]
    if cfg.quantize_base == "int8":
      scale = group.pop(target.kernel + SCALE_SUFFIX)
      group[target.kernel] = dequantize(group[target.kernel], scale, dtype)
    adapter = dict(group[adapter_name(name)])
    adapter["b"] = adapter["b"] * scaling
    if dropout_rng is not None and cfg.lora_dropout > 0:
      adapter["dropout"] = (jax.random.fold_in(dropout_rng, i), cfg.lora_dropout)
    group[adapter_name(name)] = adapter
  return layer


def add_delta(y: Array, x: Array, weights: Mapping[str, Any], target: str) -> Array:
  """y + (x A) B' for the adapter of `target` in `weights` (a layer's attn or mlp group, prepared by
  `prepare_layer`), else y. x: [..., in...] (the kernel's input axes); y: [..., out...]."""
  adapter = weights.get(adapter_name(target))
  if adapter is None:
    return y
  a, b = adapter["a"].astype(x.dtype), adapter["b"].astype(x.dtype)
  if "dropout" in adapter:
    rng, rate = adapter["dropout"]
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
  down = jnp.tensordot(x, a, axes=TARGETS[target].in_dims)  # [..., rank]
  return y + jnp.tensordot(down, b, axes=1).astype(y.dtype)


# ------------------------------------------------------------------------------------------------
# The int8 base.


def quantize(kernel: Array, in_dims: int) -> tuple[Array, Array]:
  """kernel [in..., out...] -> (int8 kernel, float32 scale [out...]): symmetric, one scale per output
  channel, scale = max |W| over the inputs / 127."""
  w = kernel.astype(jnp.float32)
  scale = jnp.max(jnp.abs(w), axis=tuple(range(in_dims)))
  scale = jnp.where(scale > 0, scale / 127.0, 1.0)
  return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale


def dequantize(q: Array, scale: Array, dtype: Any) -> Array:
  """int8 kernel [in..., out...] times its scale [out...], in dtype."""
  return q.astype(dtype) * scale.astype(dtype)


def quantize_base(cfg: Any, base: dict[str, Any]) -> dict[str, Any]:
  """The frozen base params (layers stacked) with cfg.lora_targets' kernels int8 + scales, as the
  decoder declares them for cfg.quantize_base="int8"; other params unchanged. Call under jit."""
  if cfg.quantize_base != "int8":
    return base

  def to_int8(group: dict[str, Any], target: Any) -> None:
    # Per layer: the leading layers axis is not an input axis.
    q, scale = jax.vmap(lambda w: quantize(w, target.in_dims))(group[target.kernel])
    group[target.kernel], group[target.kernel + SCALE_SUFFIX] = q, scale

  return _with_target_groups(cfg, base, to_int8)


def dequantize_base(cfg: Any, base: dict[str, Any], dtype: Any = jnp.float32) -> dict[str, Any]:
  """The inverse of `quantize_base` up to rounding: plain float kernels in dtype."""
  if cfg.quantize_base != "int8":
    return base

  def to_float(group: dict[str, Any], target: Any) -> None:
    scale = group.pop(target.kernel + SCALE_SUFFIX)
    group[target.kernel] = jax.vmap(lambda q, s: dequantize(q, s, dtype))(group[target.kernel], scale)

  return _with_target_groups(cfg, base, to_float)


def _with_target_groups(cfg: Any, base: dict[str, Any], update: Callable[[dict[str, Any], Any], None]
                        ) -> dict[str, Any]:
  """A copy of `base` in which `update(group, target)` has edited (in place) a copy of the layer group of
  each of cfg.lora_targets."""
  layers = {name: dict(group) if isinstance(group, Mapping) else group
            for name, group in base["layers"].items()}
  for name in cfg.lora_targets:
    update(layers[TARGETS[name].group], TARGETS[name])
  return {**base, "layers": layers}


# ------------------------------------------------------------------------------------------------
# Param trees: base <-> adapters.


def is_adapter_path(path: tuple[Any, ...]) -> bool:
  return any(str(getattr(k, "key", "")).endswith(ADAPTER_SUFFIX) for k in path)


def split(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(base, adapters) of a param tree (plain or boxed): adapters = {"layers": {group: {"q_lora": ...}}}."""
  layers = params["layers"]
  base_layers, adapters = {}, {}
  for group_name, group in layers.items():
    if not isinstance(group, Mapping):
      base_layers[group_name] = group
      continue
    base_layers[group_name] = {k: v for k, v in group.items() if not k.endswith(ADAPTER_SUFFIX)}
    found = {k: v for k, v in group.items() if k.endswith(ADAPTER_SUFFIX)}
    if found:
      adapters[group_name] = found
  return {**params, "layers": base_layers}, {"layers": adapters}


def combine(base: dict[str, Any], adapters: dict[str, Any]) -> dict[str, Any]:
  """The param tree of base + adapters (the inverse of `split`)."""
  layers = dict(base["layers"])
  for group_name, found in adapters["layers"].items():
    layers[group_name] = {**layers[group_name], **found}
  return {**base, "layers": layers}


def merge(cfg: Any, params: dict[str, Any]) -> dict[str, Any]:
  """Plain float32 params of the model without adapters: every adapted kernel W + (alpha / r) A B (an
  int8 base dequantized first)."""
  base, adapters = split(params)
  base = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      dequantize_base(cfg, base))
  scaling = cfg.lora_alpha / cfg.lora_rank
  layers = {name: dict(group) if isinstance(group, Mapping) else group
            for name, group in base["layers"].items()}
  for group_name, found in adapters["layers"].items():
    for key, adapter in found.items():
      target = TARGETS[key[:-len(ADAPTER_SUFFIX)]]
      kernel = layers[group_name][target.kernel]
      delta = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(
          adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32))
      layers[group_name][target.kernel] = kernel + scaling * delta
  return {**base, "layers": layers}
