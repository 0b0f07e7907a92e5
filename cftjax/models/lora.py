"""Low-rank adapters (LoRA, Hu et al. 2021) on the decoder's projections, and the frozen base stored in
int8, NF4 or int4 (QLoRA), as a transform of the decoder's param specs and layer weights.

With `ModelConfig.lora_rank` r > 0, every targeted kernel W [in..., out...] of a layer gets an adapter
{"a": [in..., r], "b": [r, out...]} next to it (`attn/q_lora`, `mlp/down_lora`, ...), stacked on the
layers axis like W. A projection computes x W + (alpha / r) (x A) B: the adapters are never merged
into W while training or sampling (`add_delta`, called by every weight layout of
`cftjax.models.attention`). A is drawn as PEFT draws it (kaiming-uniform with a = sqrt(5):
U(-1/sqrt(fan_in), 1/sqrt(fan_in))), B is zero, so an untrained adapter changes nothing. Adapters
carry logical axis names (the kernel's input axes, "lora_rank", the kernel's output axes), so they
shard by the same rules as their kernel (`cftjax.parallel.LOGICAL_RULES`; "lora_rank" is
replicated). Dropout (`lora_dropout`) drops the adapter's input while training.

With `ModelConfig.quantize_base` "int8", "nf4" or "int4" the targeted kernels are stored quantized
(`cftjax.models.quant`: int8 with per-channel scales, or 4-bit codes packed two per uint8 with one
absmax per block of 64 inputs) and dequantized to the compute dtype layer by layer inside the scanned
block (`prepare_layer`); no dequantized copy is kept.

Whole modules can be trained beside the adapters (PEFT's `modules_to_save`; `ModelConfig.
lora_modules_to_save`, named as in a Hugging Face model: "embed_tokens" for the `embedding` param,
"lm_head"): the trained tree then holds a full copy of the module's param, initialised from the
base's, which replaces the base's in the forward pass; the frozen base keeps the original (as PEFT
does), so the base with the adapters off is still the base. A model whose head is its embedding
(tie_embeddings) trains neither: a copy would untie them.

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

from cftjax.models import quant

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Target:
  """A projection LoRA can adapt: its param group and kernel in a layer, how many leading kernel axes
  are inputs, and the module name of the same projection in a Hugging Face layer."""

  group: str
  kernel: str
  in_dims: int
  hf_module: str
  inputs: tuple[str, ...]  # the ModelConfig fields that size the kernel's input axes


TARGETS = {
    "q": Target("attn", "q_kernel", 1, "self_attn.q_proj", ("hidden_size",)),
    "k": Target("attn", "k_kernel", 1, "self_attn.k_proj", ("hidden_size",)),
    "v": Target("attn", "v_kernel", 1, "self_attn.v_proj", ("hidden_size",)),
    "o": Target("attn", "o_kernel", 2, "self_attn.o_proj", ("num_heads", "head_dim")),
    "gate": Target("mlp", "gate_kernel", 1, "mlp.gate_proj", ("hidden_size",)),
    "up": Target("mlp", "up_kernel", 1, "mlp.up_proj", ("hidden_size",)),
    "down": Target("mlp", "down_kernel", 1, "mlp.down_proj", ("intermediate_size",)),
}
QUANTIZATIONS = ("none",) + quant.FORMATS
# The modules that can be trained whole beside the adapters, by their HF / PEFT name: the param it is.
MODULES_TO_SAVE = {"embed_tokens": "embedding", "lm_head": "lm_head"}
ADAPTER_SUFFIX = "_lora"  # attn/q_lora holds the adapter of attn/q_kernel
SCALE_SUFFIX = "_scale"  # attn/q_kernel_scale: the quantized q_kernel's scales (int8) or block absmax
RANK_AXIS = "lora_rank"


def adapter_name(target: str) -> str:
  return target + ADAPTER_SUFFIX


def check_settings(rank: int, alpha: float, dropout: float, targets: tuple[str, ...],
                   quantize_base: str, sizes: Mapping[str, Any],
                   modules_to_save: tuple[str, ...] = ()) -> None:
  """Raises ValueError naming the setting (model.lora.<key>) that cannot be used; `sizes`: the
  model's hidden_size, num_heads, head_dim, intermediate_size and tie_embeddings (a 4-bit base
  needs each targeted kernel's input size to be a multiple of its block)."""
  if rank < 0:
    raise ValueError(f"model.lora.rank={rank} must be >= 0 (0 turns LoRA off)")
  if not rank:
    for key, value in (("quantize_base", quantize_base != "none" and repr(quantize_base)),
                       ("modules_to_save", modules_to_save and tuple(modules_to_save))):
      if value:
        raise ValueError(f"model.lora.{key}={value} needs adapters to train: set model.lora.rank > 0")
    return
  unknown = [m for m in modules_to_save if m not in MODULES_TO_SAVE]
  if unknown or len(set(modules_to_save)) != len(modules_to_save):
    raise ValueError(f"model.lora.modules_to_save={tuple(modules_to_save)}: name each of "
                     f"{tuple(MODULES_TO_SAVE)} at most once")
  if modules_to_save and sizes.get("tie_embeddings"):
    raise ValueError(f"model.lora.modules_to_save={tuple(modules_to_save)} needs an untied lm_head, but "
                     "the model ties it to the embedding (model.arch.tie_embeddings): a trained copy "
                     "would untie them; drop modules_to_save")
  if alpha <= 0:
    raise ValueError(f"model.lora.alpha={alpha} must be > 0")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"model.lora.dropout={dropout} must be in [0, 1)")
  unknown = [t for t in targets if t not in TARGETS]
  if unknown or not targets:
    raise ValueError(f"model.lora.targets={tuple(targets)}: name one or more of {tuple(TARGETS)}")
  if quantize_base not in QUANTIZATIONS:
    raise ValueError(f"model.lora.quantize_base={quantize_base!r} is not one of {QUANTIZATIONS}")
  for name in targets:
    target = TARGETS[name]
    quant.check_block_inputs(quantize_base, target.kernel, tuple(sizes[f] for f in target.inputs),
                             " x ".join(target.inputs))


# ------------------------------------------------------------------------------------------------
# Specs: what the decoder declares.


def _init_a(fan_in_axes: tuple[int, ...]):
  """PEFT's kaiming_uniform_(a=sqrt(5)) of lora_A: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=fan_in_axes,
                                          out_axis=-1)


def extend_layer_specs(cfg: Any, specs: dict[str, Any]) -> dict[str, Any]:
  """One layer's param specs ({group: {name: (shape, axes, init[, dtype])}}) with the adapters of
  cfg.lora_targets and, with a cfg.quantize_base, the targeted kernels' codes plus scales."""
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
    if cfg.quantize_base != "none":
      (q_shape, q_axes, q_dtype), (s_shape, s_axes) = quant.stored_specs(shape, axes, n, cfg.quantize_base)
      group[target.kernel] = (q_shape, q_axes, nn.initializers.zeros, q_dtype)  # filled by quantize_base
      group[target.kernel + SCALE_SUFFIX] = (s_shape, s_axes, nn.initializers.ones, jnp.float32)
  return specs


# ------------------------------------------------------------------------------------------------
# Applying adapters.


def prepare_layer(cfg: Any, layer: dict[str, Any], dtype: Any, dropout_rng: Array | None = None
                  ) -> dict[str, Any]:
  """One layer's weights as the block's layouts use them: quantized kernels dequantized to `dtype`
  (their scales dropped), each adapter's B scaled by alpha / rank, and with `dropout_rng` (training with
  cfg.lora_dropout > 0) a key per adapter for dropping its input."""
  if not cfg.lora_rank:
    return layer
  layer = {name: dict(group) if isinstance(group, Mapping) else group for name, group in layer.items()}
  scaling = cfg.lora_alpha / cfg.lora_rank
  for i, name in enumerate(cfg.lora_targets):
    target = TARGETS[name]
    group = layer[target.group]
    if cfg.quantize_base != "none":
      scale = group.pop(target.kernel + SCALE_SUFFIX)
      group[target.kernel] = quant.dequantize(group[target.kernel], scale, target.in_dims, cfg.quantize_base,
                                              dtype)
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
# The quantized base.


def quantize_base(cfg: Any, base: dict[str, Any]) -> dict[str, Any]:
  """The frozen base params (layers stacked) with cfg.lora_targets' kernels quantized (codes + scales),
  as the decoder declares them for cfg.quantize_base; other params unchanged. Call under jit."""
  if cfg.quantize_base == "none":
    return base

  def to_codes(group: dict[str, Any], target: Any) -> None:
    # Per layer: the leading layers axis is not an input axis.
    q, scale = jax.vmap(lambda w: quant.quantize(w, target.in_dims, cfg.quantize_base))(group[target.kernel])
    group[target.kernel], group[target.kernel + SCALE_SUFFIX] = q, scale

  return _with_target_groups(cfg, base, to_codes)


def dequantize_base(cfg: Any, base: dict[str, Any], dtype: Any = jnp.float32) -> dict[str, Any]:
  """The inverse of `quantize_base` up to rounding: plain float kernels in dtype."""
  if cfg.quantize_base == "none":
    return base

  def to_float(group: dict[str, Any], target: Any) -> None:
    scale = group.pop(target.kernel + SCALE_SUFFIX)
    group[target.kernel] = jax.vmap(
        lambda q, s: quant.dequantize(q, s, target.in_dims, cfg.quantize_base, dtype))(group[target.kernel], scale)

  return _with_target_groups(cfg, base, to_float)


def check_packed_shardings(cfg: Any, float_base: dict[str, Any], base: dict[str, Any]) -> None:
  """Raises ValueError when packing a 4-bit base (halving each targeted kernel's last input axis)
  leaves that axis no longer divisible by the mesh axes that shard the float kernel. `float_base`
  and `base`: the frozen base's shardings (layers stacked) without and with cfg.quantize_base."""
  for name in cfg.lora_targets:
    target = TARGETS[name]
    dim = target.in_dims  # the packed axis; axis 0 is the layers axis
    specs = [tuple(tree["layers"][target.group][target.kernel].spec) + (None,) * (dim + 1)
             for tree in (float_base, base)]
    if specs[0][dim] != specs[1][dim]:
      raise ValueError(
          f"model.lora.quantize_base={cfg.quantize_base!r}: packing two 4-bit codes per byte halves the "
          f"last input axis of layers/{target.group}/{target.kernel}, which mesh axes {specs[0][dim]} "
          "then no longer divide; use a mesh whose size along them divides half that axis, or "
          "quantize_base='int8'")


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


def saved_params(modules_to_save: tuple[str, ...]) -> tuple[str, ...]:
  """The top-level params of `modules_to_save` (HF module names): ("embed_tokens",) -> ("embedding",)."""
  return tuple(MODULES_TO_SAVE[m] for m in modules_to_save)


def split(params: dict[str, Any], modules_to_save: tuple[str, ...] = ()
          ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(base, trained) of a param tree (plain or boxed): trained = {"layers": {group: {"q_lora": ...}}}
  plus a copy of the param of each of `modules_to_save` (e.g. "embedding" for "embed_tokens"),
  which the base keeps too."""
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
  saved = {p: params[p] for p in saved_params(modules_to_save)}
  return {**params, "layers": base_layers}, {"layers": adapters, **saved}


def combine(base: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
  """The param tree of base + trained params (the inverse of `split`): the adapters join their
  layers, trained whole modules replace the base's."""
  layers = dict(base["layers"])
  for group_name, found in trained["layers"].items():
    layers[group_name] = {**layers[group_name], **found}
  return {**base, **trained, "layers": layers}


def adapters_off(trained: dict[str, Any]) -> dict[str, Any]:
  """Trained params that leave the base unchanged when combined with it: every adapter zero (B = 0
  adds nothing) and no trained module (the base keeps its own)."""
  return {"layers": jax.tree.map(jnp.zeros_like, trained["layers"])}


def merge(cfg: Any, params: dict[str, Any]) -> dict[str, Any]:
  """Plain float32 params of the model without adapters from its whole tree (`combine`d, so trained
  modules are already in place): every adapted kernel W + (alpha / r) A B (an quantized base
  dequantized first)."""
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
