"""Weight-only quantization of a kernel W [in..., out...] (the frozen base of QLoRA).

  int8: symmetric, one float32 scale per output channel (absmax over the inputs / 127); codes int8.
  nf4:  block-wise 4-bit NormalFloat (Dettmers et al. 2023, "QLoRA", appendix E): the inputs of each
        output channel, flattened in row-major order, fall into blocks of `BLOCK` (64); a block keeps
        its absmax (float32) and each weight the index of the nearest of the 16 `NF4_LEVELS` to
        w / absmax. The layout bitsandbytes uses for a torch Linear weight [out, in].
  int4: the same blocks with 15 evenly spaced symmetric levels k / 7, k = -7..7 (round to nearest).

4-bit codes are packed two per uint8 along the last input axis (element 2i in the high nibble, 2i + 1
in the low one), so a packed kernel keeps the kernel's axes (and logical axis names) with the last
input axis halved; its absmax is [prod(in) / BLOCK, out...], named like the kernel's first input axis
and its output axes. `dequantize` unpacks and scales inside the forward, in the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

FORMATS = ("int8", "nf4", "int4")
BLOCK = 64  # inputs per 4-bit block (the QLoRA paper's block size)
# The QLoRA paper's NF4 levels (appendix E), as float32.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
# Code 0 (-8 / 7) is never chosen: |w / absmax| <= 1.
INT4_LEVELS = (np.arange(16, dtype=np.float32) - 8.0) / 7.0
LEVELS = {"nf4": NF4_LEVELS, "int4": INT4_LEVELS}


def check_block_inputs(fmt: str, kernel: str, in_shape: tuple[int, ...], described: str) -> None:
  """Raises ValueError (naming model.lora.quantize_base) when a kernel with inputs `in_shape`
  (`described`: the config fields they come from) cannot be split into 4-bit blocks and packed."""
  if fmt not in LEVELS:
    return
  if math.prod(in_shape) % BLOCK or in_shape[-1] % 2:
    raise ValueError(
        f"model.lora.quantize_base={fmt!r} quantizes {kernel} in blocks of {BLOCK} inputs packed in "
        f"pairs, but it has {described} = {'x'.join(map(str, in_shape))} inputs: use a model whose input "
        f"size is a multiple of {BLOCK}, quantize_base='int8', or drop the target from model.lora.targets")


def stored_specs(shape: tuple[int, ...], axes: tuple[Any, ...], in_dims: int, fmt: str
                 ) -> tuple[tuple[tuple[int, ...], tuple[Any, ...], Any], tuple[tuple[int, ...], tuple[Any, ...]]]:
  """How a kernel of `shape` (logical `axes`) is stored in `fmt`: ((codes shape, axes, dtype), (scale
  shape, axes)); the scale is float32."""
  n = in_dims
  if fmt == "int8":
    return (shape, axes, jnp.int8), (shape[n:], axes[n:])
  packed = shape[:n - 1] + (shape[n - 1] // 2,) + shape[n:]
  return (packed, axes, jnp.uint8), ((math.prod(shape[:n]) // BLOCK,) + shape[n:], axes[:1] + axes[n:])


def quantize(kernel: Array, in_dims: int, fmt: str) -> tuple[Array, Array]:
  """kernel [in..., out...] -> (codes, float32 scale) as laid out by `stored_specs`."""
  w = kernel.astype(jnp.float32)
  if fmt == "int8":
    scale = jnp.max(jnp.abs(w), axis=tuple(range(in_dims)))
    scale = jnp.where(scale > 0, scale / 127.0, 1.0)
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale
  in_shape, out_shape = kernel.shape[:in_dims], kernel.shape[in_dims:]
  blocks = w.reshape((-1, BLOCK) + out_shape)  # [blocks, BLOCK, out...]
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  inverse = jnp.where(absmax > 0, 1.0 / absmax, 0.0)  # w * (1 / absmax), as bitsandbytes scales
  scaled = jnp.clip(blocks * inverse[:, None], -1.0, 1.0)
  levels = LEVELS[fmt]
  midpoints = jnp.asarray((levels[:-1] + levels[1:]) / np.float32(2.0))
  codes = jnp.searchsorted(midpoints, scaled, side="left").astype(jnp.uint8)  # ties go to the lower level
  codes = codes.reshape(in_shape[:-1] + (in_shape[-1] // 2, 2) + out_shape)
  high, low = jnp.moveaxis(codes, in_dims, 0)
  return (high << 4) | low, absmax


def dequantize(codes: Array, scale: Array, in_dims: int, fmt: str, dtype: Any) -> Array:
  """The kernel [in..., out...] in dtype from `quantize`'s (codes, scale)."""
  if fmt == "int8":
    return codes.astype(dtype) * scale.astype(dtype)
  out_shape = codes.shape[in_dims:]
  unpacked = jnp.stack([codes >> 4, codes & 15], axis=in_dims)  # [..., in_last / 2, 2, out...]
  in_shape = codes.shape[:in_dims - 1] + (2 * codes.shape[in_dims - 1],)
  values = jnp.asarray(LEVELS[fmt], dtype)[unpacked.astype(jnp.int32)]
  blocks = values.reshape((-1, BLOCK) + out_shape) * scale.astype(dtype)[:, None]
  return blocks.reshape(in_shape + out_shape)
