"""The decoder's platform-specific choices behind one dispatch: attention kernels and weight layouts.

`ModelConfig.attention` names an entry of `BACKENDS`, or "auto": `AUTO[platform]` (`resolve`; the
training losses resolve it for the platform of the run's mesh, elsewhere JAX's default backend).
A `Backend` gives
- `attend`, the cache-free attention of training and scoring: (q, k, v, segment_ids) -> out;
- `decode`, the sampler's one-token step: the weight `Layout` the block runs on, the per-layer cache
  layout and the attention over that cache.
The prefill (a forward with a KV cache) attends with `cache_attention` on every backend, and training
always runs the `STANDARD` layout (the param tree itself). Adding a backend is one `BACKENDS` entry,
plus an `AUTO` line if a platform should pick it.

Shapes: q [batch, seq, heads, head_dim], k and v [batch, seq, kv_heads, head_dim], segment_ids
[batch, seq] int32 (0 = padding) or None (one causal sequence per row).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from cftjax import parallel
from cftjax.config import ConfigError
from cftjax.models import lora

Array = jax.Array
Weights = dict[str, Any]
LayerCache = dict[str, Array]  # one layer's {"k", "v"}


# Masks and the KV cache.


def attention_mask(q_positions: Array, k_positions: Array, q_segments: Array | None,
                   k_segments: Array | None) -> Array:
  """Causal (and same-segment) mask [batch, 1, q_len, k_len]: key position <= query position."""
  mask = k_positions[:, None, :] <= q_positions[:, :, None]
  if q_segments is not None:
    mask &= q_segments[:, :, None] == k_segments[:, None, :]
  return mask[:, None]


def segment_mask(segment_ids: Array) -> Array:
  """Mask [batch, 1, seq, seq] of packed rows: causal by index within a row, and same segment."""
  index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
  return attention_mask(index, index, segment_ids, segment_ids)


def sequence_lengths(segment_ids: Array) -> Array:
  """Tokens per row [batch] int32 of rows laid out as one segment then padding (ids 1..1 0..0)."""
  return jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)


def cache_mask(positions: Array, num_slots: int) -> Array:
  """Mask [batch, 1, seq, slots] of queries at `positions` [batch, seq] over cache slots (slot i holds
  position i of its row)."""
  slots = jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32), (positions.shape[0], num_slots))
  return attention_mask(positions, slots, None, None)


# Logical axes of one layer's cache [batch, kv_heads, slots, head_dim]: sharded over KV heads.
CACHE_AXES = ("batch", "kv_heads", "seq", "head_dim")


def write_cache(layer_cache: Array, new: Array, start: Array, *, slots_last: bool = False) -> Array:
  """Writes new [batch, seq, kv_heads, head_dim] into one layer's cache [batch, kv_heads, slots, head_dim]
  (with slots_last: [batch, kv_heads, head_dim, slots]) at slots start[b] .. start[b] + seq - 1 of each
  row b (start: [batch] int32), or with a scalar start at the same slots for every row: one in-place
  update instead of a per-row scatter (which the TPU compiler lowers to a loop over the rows)."""
  new = (new.transpose(0, 2, 3, 1) if slots_last else new.swapaxes(1, 2)).astype(layer_cache.dtype)
  if jnp.ndim(start) == 0:
    return jax.lax.dynamic_update_slice_in_dim(layer_cache, new, start, axis=3 if slots_last else 2)
  write_row = lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=2 if slots_last else 1)
  return jax.vmap(write_row)(layer_cache, new, start)


def cache_attention(q: Array, k: Array, v: Array, cache: LayerCache,
                    positions: Array) -> tuple[Array, LayerCache]:
  """Writes k, v at slots = positions [batch, seq] (contiguous per row; or [1, seq], the same for every
  row: one in-place write) of one layer's cache {"k", "v"}: [batch, kv_heads, slots, head_dim], then
  attends q to the slots <= each query's position through `jax.nn.dot_product_attention`. Returns
  (out [batch, seq, heads, head_dim], the updated cache)."""
  cache = write_layer_cache(cache, k, v, positions[0, 0] if positions.shape[0] == 1 else positions[:, 0])
  keys, values = (cache[name].swapaxes(1, 2).astype(q.dtype) for name in ("k", "v"))
  mask = cache_mask(positions, keys.shape[1])
  return jax.nn.dot_product_attention(q, keys, values, mask=mask), cache


def write_layer_cache(cache: LayerCache, k: Array, v: Array, start: Array) -> LayerCache:
  """k, v [batch, seq, kv_heads, head_dim] written at slots start[b] .. (or start .. for a scalar) of
  one layer's cache {"k", "v"} [batch, kv_heads, slots, head_dim], which keeps its placement
  (`CACHE_AXES`)."""
  write = lambda name, new: nn.with_logical_constraint(write_cache(cache[name], new, start), CACHE_AXES)
  return {"k": write("k", k), "v": write("v", v)}


def einsum_decode_attention(q: Array, k: Array, v: Array, cache: LayerCache, slot: Array,
                            visible: Array) -> tuple[Array, LayerCache]:
  """One token per row over a cache {"k", "v"} [batch, kv_heads, slots, head_dim]: writes k, v at
  `slot`, then attends as two batched matmuls on the cache's own layout (float32 scores and softmax
  over the `visible` slots), each KV head's query heads folded into one product."""
  batch, _, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  cache = write_layer_cache(cache, k, v, slot)
  q = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("bkgh,bksh->bkgs", q, cache["k"].astype(q.dtype), preferred_element_type=jnp.float32)
  scores = jnp.where(visible[:, None, None, :], scores / math.sqrt(head_dim), -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  out = jnp.einsum("bkgs,bksh->bkgh", probs, cache["v"].astype(q.dtype))
  return out.reshape(batch, 1, heads, head_dim), cache


# Training attention (no cache).


def xla_attention(q: Array, k: Array, v: Array, segment_ids: Array | None) -> Array:
  """`jax.nn.dot_product_attention` (XLA's kernel, scores materialised): `is_causal` alone without
  segment ids, else an explicit causal + same-segment mask (packed rows)."""
  if segment_ids is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)
  return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids))


def blocked_attention(q: Array, k: Array, v: Array, segment_ids: Array | None) -> Array:
  """`causal_attention` under the causal (+ same-segment) mask of the rows."""
  if segment_ids is None:
    segment_ids = jnp.ones(q.shape[:2], jnp.int32)
  return causal_attention(q, k, v, segment_mask(segment_ids))


def cudnn_attention(q: Array, k: Array, v: Array, segment_ids: Array | None) -> Array:
  """cuDNN flash attention told each row's length: rows hold one sequence then padding."""
  lengths = None if segment_ids is None else sequence_lengths(segment_ids)
  return padded_causal_attention(q, k, v, lengths, implementation="cudnn")


SPLASH_BLOCK = 512  # splash attention's query and key block (rows are padded to a multiple of it)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array | None, *,
                     interpret: bool = False) -> Array:
  """Splash attention (Pallas TPU, `jax.experimental.pallas.ops.tpu.splash_attention`): a causal
  flash kernel that skips the blocks above the diagonal and takes the segment ids of packed rows
  (queries attend to keys of their own segment only). Queries are scaled by 1/sqrt(head_dim) in their
  dtype first. Rows are padded to a multiple of the block (segment 0, then cut off).

  Inside `parallel.use_mesh` it runs under `jax.shard_map`, each device on its rows and heads (the
  logical "batch", "heads" and "kv_heads" placements). interpret=True runs the kernel in Pallas'
  interpreter (any platform; for tests).
  """
  batch, seq, _, head_dim = q.shape
  if segment_ids is None:
    segment_ids = jnp.ones((batch, seq), jnp.int32)
  block = min(SPLASH_BLOCK, -(-seq // 128) * 128)
  pad = -seq % block
  q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
  segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)))
  q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)

  def attend(q, k, v, segments):  # this device's [rows, seq, heads here, head_dim]
    kernel = splash.make_splash_mha(
        splash_mask.MultiHeadMask([splash_mask.CausalMask((seq + pad, seq + pad))] * q.shape[2]),
        block_sizes=splash.BlockSizes(*(block,) * 8), head_shards=1, q_seq_shards=1, interpret=interpret)
    one_row = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s))
    out = jax.vmap(one_row)(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), segments)
    return out.swapaxes(1, 2)

  if parallel.entered() is None:
    out = attend(q, k, v, segment_ids)
  else:
    rows, _, heads, _ = parallel.split_axes(q.shape, ("batch", "seq", "heads", "head_dim"), "queries")
    kv_heads = parallel.split_axes(k.shape, ("batch", "seq", "kv_heads", "head_dim"), "keys")[2]
    if heads != kv_heads:  # query and KV heads must split alike to keep their grouping
      heads = kv_heads = ()
    q_spec, kv_spec = P(rows or None, None, heads or None, None), P(rows or None, None, kv_heads or None, None)
    out = jax.shard_map(attend, mesh=parallel.current()[0], in_specs=(q_spec, kv_spec, kv_spec, P(rows or None, None)),
                        out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)
  return out[:, :seq]


MIN_QUERY_BLOCK = 64  # causal attention splits queries into blocks of at least this many rows
MAX_QUERY_BLOCKS = 8


def causal_attention(q: Array, key: Array, value: Array, mask: Array) -> Array:
  """Masked grouped-query attention under a mask that is causal by index, skipping the masked half.

  mask: [batch, 1, seq, seq], False wherever key index > query index (segments may clear more).
  Queries are split into up to MAX_QUERY_BLOCKS blocks and block b attends only to the keys before
  its end, so the all-masked blocks above the diagonal are never computed: (n + 1) / 2n of the work
  for n blocks, and each block's scores are a smaller temporary. Each block's softmax still covers
  every key it may see, so the result is exact. Each block runs as `grouped_attention`.
  """
  batch, seq, heads, head_dim = q.shape
  kv_heads = key.shape[2]
  q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
  key, value = key.swapaxes(1, 2), value.swapaxes(1, 2)
  bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
  num_blocks = max(1, min(MAX_QUERY_BLOCKS, seq // MIN_QUERY_BLOCK))
  bounds = [seq * i // num_blocks for i in range(num_blocks + 1)]
  blocks = [grouped_attention(q[:, :, :, start:end], key[:, :, :end], value[:, :, :end],
                              bias[:, :, start:end, :end])
            for start, end in zip(bounds[:-1], bounds[1:])]
  out = jnp.concatenate(blocks, axis=3)  # [batch, kv_heads, groups, seq, head_dim]
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads, head_dim)


@jax.custom_vjp
def grouped_attention(q: Array, key: Array, value: Array, bias: Array) -> Array:
  """softmax(q key^T / sqrt(head_dim) + bias) value with each KV head's query heads folded into rows.

  q: [batch, kv_heads, groups, q_len, head_dim], key/value: [batch, kv_heads, k_len, head_dim],
  bias: [batch, 1, q_len, k_len] float32 (0 where attended, the float32 minimum where masked).
  Scores and softmax are float32. The backward pass reuses the saved probabilities (one
  [q_len, k_len] array per query head) instead of autodiff's residuals (docs/benchmarks.md).
  """
  return _grouped_attention_fwd(q, key, value, bias)[0]


def _grouped_attention_fwd(q, key, value, bias):
  scale = 1.0 / math.sqrt(q.shape[-1])
  scores = jnp.einsum("bkgqh,bksh->bkgqs", q, key, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(scores * scale + bias[:, :, None], axis=-1).astype(value.dtype)
  out = jnp.einsum("bkgqs,bksh->bkgqh", probs, value)
  return out, (q, key, value, probs, out)


def _grouped_attention_bwd(residuals, d_out):
  q, key, value, probs, out = residuals
  scale = 1.0 / math.sqrt(q.shape[-1])
  d_probs = jnp.einsum("bkgqh,bksh->bkgqs", d_out, value, preferred_element_type=jnp.float32)
  row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_scores = (probs.astype(jnp.float32) * (d_probs - row_dot) * scale).astype(q.dtype)
  d_q = jnp.einsum("bkgqs,bksh->bkgqh", d_scores, key)
  d_key = jnp.einsum("bkgqh,bkgqs->bksh", q, d_scores)
  d_value = jnp.einsum("bkgqh,bkgqs->bksh", d_out, probs)
  return d_q, d_key, d_value, None


grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


def padded_causal_attention(q: Array, key: Array, value: Array, seq_lengths: Array | None,
                            implementation: str) -> Array:
  """Causal attention over rows that each hold one sequence of seq_lengths[b] tokens, then padding.

  seq_lengths: [batch] int32 or None (no padding). No mask array is built: cuDNN's flash kernel
  ("cudnn") skips the tiles above the diagonal and past each length. Padded query rows are not
  meaningful; losses mask them.
  """
  return jax.nn.dot_product_attention(q, key, value, is_causal=True, query_seq_lengths=seq_lengths,
                                      key_value_seq_lengths=seq_lengths, implementation=implementation)


# Weight layouts: how the block's projections are stored and applied.


@dataclasses.dataclass(frozen=True)
class Layout:
  """One way to store and apply a layer's weights; `decoder.block` calls the projections.

  layer_weights(cfg, layer params, dtype) and head_weights(lm head kernel [hidden, vocab], dtype)
  re-lay params for this layout (once per `generate` call; norm scales keep their place and dtype;
  LoRA adapters are carried over unmerged, in their own layout).
  project_qkv(cfg, attn, x [batch, seq, hidden]) -> q, k, v; project_out(cfg, attn, out) -> [batch,
  seq, hidden]; mlp(mlp weights, x) -> [batch, seq, hidden]; logits(head, x [..., hidden]) -> float32.
  Each projection adds its LoRA adapter's output where the weights hold one (`lora.add_delta`).
  """

  layer_weights: Callable[..., Weights]
  head_weights: Callable[[Array, Any], Array]
  project_qkv: Callable[..., tuple[Array, Array, Array]]
  project_out: Callable[..., Array]
  mlp: Callable[[Weights, Array], Array]
  logits: Callable[[Array, Array], Array]


def matmul_2d(x: Array, w: Array) -> Array:
  """x [..., in] @ w [in, out] as one [rows, in] @ [in, out] product.

  Same math as `x @ w` on every backend (the reshapes of contiguous arrays are free); its transpose
  gives the weight gradient as one [in, rows] @ [rows, out] product, where XLA CPU otherwise copies
  the [batch, seq, in] activations to a transposed layout first (docs/benchmarks.md).
  """
  return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


@functools.partial(jax.checkpoint, prevent_cse=False)
def swiglu_down(gate: Array, up: Array, down: Array, mlp: Weights | None = None) -> Array:
  """(silu(gate) * up) @ down for gate, up [batch, seq, intermediate] and down [intermediate, hidden],
  plus the down adapter of `mlp` (a layer's MLP weights) if it holds one.

  Rematerialised on every backend, whatever `model.remat` says: autodiff keeps gate and up (plus
  down) and recomputes silu and the product in one elementwise pass of the backward pass, so a layer
  stores 2 instead of 6 [tokens, intermediate] arrays. No matmul is recomputed.
  """
  hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
  return lora.add_delta(matmul_2d(hidden, down), hidden, mlp or {}, "down")


def cast_weights(tree: Weights, dtype) -> Weights:
  """Floating kernels, biases and adapters in dtype; norm scales and quantisation scales (leaves
  named "scale" or "*_scale") and integer codes as stored."""
  keep = lambda path, w: path[-1].key.endswith("scale") or not jnp.issubdtype(w.dtype, jnp.floating)
  return jax.tree_util.tree_map_with_path(lambda path, w: w if keep(path, w) else w.astype(dtype), tree)


def _adapters(group: Weights) -> Weights:
  """The LoRA adapters of a layer's attn or mlp weights."""
  return {name: w for name, w in group.items() if name.endswith(lora.ADAPTER_SUFFIX)}


def _standard_qkv(cfg, attn: Weights, x: Array) -> tuple[Array, Array, Array]:
  def project(name):
    y = jnp.einsum("btd,dnh->btnh", x, attn[f"{name}_kernel"].astype(x.dtype))
    if cfg.attention_bias:
      y = y + attn[f"{name}_bias"].astype(x.dtype)
    return lora.add_delta(y, x, attn, name)

  return project("q"), project("k"), project("v")


def _standard_out(cfg, attn: Weights, out: Array) -> Array:
  y = jnp.einsum("btnh,nhd->btd", out, attn["o_kernel"].astype(out.dtype))
  if cfg.o_proj_bias:
    y = y + attn["o_bias"].astype(out.dtype)
  return lora.add_delta(y, out, attn, "o")


def _standard_mlp(mlp: Weights, x: Array) -> Array:
  gate = lora.add_delta(matmul_2d(x, mlp["gate_kernel"].astype(x.dtype)), x, mlp, "gate")
  up = lora.add_delta(matmul_2d(x, mlp["up_kernel"].astype(x.dtype)), x, mlp, "up")
  return swiglu_down(gate, up, mlp["down_kernel"].astype(x.dtype), _adapters(mlp))


def _standard_logits(head: Array, x: Array) -> Array:
  return jnp.einsum("...d,dv->...v", x, head.astype(x.dtype)).astype(jnp.float32)


# The param tree itself: [in..., out...] kernels, cast to the compute dtype where they are used.
STANDARD = Layout(layer_weights=lambda cfg, layer, dtype: cast_weights(layer, dtype),
                  head_weights=lambda head, dtype: head.astype(dtype), project_qkv=_standard_qkv,
                  project_out=_standard_out, mlp=_standard_mlp, logits=_standard_logits)


def _out_in(kernel: Array, in_dims: int, dtype) -> Array:
  """A kernel [in..., out...] whose first `in_dims` axes are inputs -> [out, in] in dtype."""
  return kernel.reshape(math.prod(kernel.shape[:in_dims]), -1).T.astype(dtype)


def _out_in_layer(cfg, layer: Weights, dtype) -> Weights:
  """q/k/v and gate/up stacked on the output axis (one product each), every kernel [out, in]."""
  attn, mlp = layer["attn"], layer["mlp"]
  out_attn = {"qkv": jnp.concatenate([_out_in(attn[f"{name}_kernel"], 1, dtype) for name in "qkv"]),
              "o": _out_in(attn["o_kernel"], 2, dtype)}
  if cfg.attention_bias:
    out_attn["qkv_bias"] = jnp.concatenate([attn[f"{name}_bias"].reshape(-1) for name in "qkv"]).astype(dtype)
  if cfg.o_proj_bias:
    out_attn["o_bias"] = attn["o_bias"].astype(dtype)
  if cfg.qk_norm:
    out_attn["q_norm"], out_attn["k_norm"] = attn["q_norm"], attn["k_norm"]
  gate_up = jnp.concatenate([_out_in(mlp[f"{name}_kernel"], 1, dtype) for name in ("gate", "up")])
  out_mlp = {"gate_up": gate_up, "down": _out_in(mlp["down_kernel"], 1, dtype)}
  out_attn |= cast_weights(_adapters(attn), dtype)
  out_mlp |= cast_weights(_adapters(mlp), dtype)
  return {"input_norm": layer["input_norm"], "post_attn_norm": layer["post_attn_norm"], "attn": out_attn,
          "mlp": out_mlp}


def linear(x: Array, weight: Array) -> Array:
  """x [..., in] times weight [out, in] -> [..., out], computed as (weight @ x.T).T.

  The optimization barriers keep XLA from folding the two small transposes into the dot, which
  would turn it back into the [rows, in] @ [in, out] form that the layout avoids.
  """
  x_t = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
  return jax.lax.optimization_barrier(weight @ x_t).T.reshape(*x.shape[:-1], weight.shape[0])


def _out_in_qkv(cfg, attn: Weights, x: Array) -> tuple[Array, Array, Array]:
  n, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  qkv = linear(x, attn["qkv"])
  if cfg.attention_bias:
    qkv = qkv + attn["qkv_bias"]
  q, k, v = jnp.split(qkv, [n * hd, (n + kv) * hd], axis=-1)
  lead = x.shape[:-1]
  q, k, v = q.reshape(*lead, n, hd), k.reshape(*lead, kv, hd), v.reshape(*lead, kv, hd)
  return lora.add_delta(q, x, attn, "q"), lora.add_delta(k, x, attn, "k"), lora.add_delta(v, x, attn, "v")


def _out_in_out(cfg, attn: Weights, out: Array) -> Array:
  y = linear(out.reshape(*out.shape[:-2], -1), attn["o"])
  if cfg.o_proj_bias:
    y = y + attn["o_bias"]
  return lora.add_delta(y, out, attn, "o")


def _out_in_mlp(mlp: Weights, x: Array) -> Array:
  gate, up = jnp.split(linear(x, mlp["gate_up"]), 2, axis=-1)
  gate, up = lora.add_delta(gate, x, mlp, "gate"), lora.add_delta(up, x, mlp, "up")
  hidden = jax.nn.silu(gate) * up
  return lora.add_delta(linear(hidden, mlp["down"]), hidden, mlp, "down")


# Every projection a 2-D [out, in] matrix applied as (W @ x.T).T: at decode batch sizes XLA CPU's dot
# kernels stream the big operand faster when it is the left one (docs/benchmarks.md).
OUT_IN = Layout(layer_weights=_out_in_layer, head_weights=lambda head, dtype: head.T.astype(dtype),
                project_qkv=_out_in_qkv, project_out=_out_in_out, mlp=_out_in_mlp,
                logits=lambda head, x: linear(x, head).astype(jnp.float32))


# Decode: one token per row over per-layer caches.


@dataclasses.dataclass(frozen=True)
class Decode:
  """The sampler's decode step. layer_cache turns one layer's prefill cache ({"k", "v"}: [batch,
  kv_heads, slots, head_dim]) into this step's cache layout (once per `generate` call); attend(q, k,
  v, cache, slot int32 scalar, visible [batch, slots] bool) writes every row's k, v at cache slot
  `slot` and attends over its visible slots: (out [batch, 1, heads, head_dim], the updated cache)."""

  layout: Layout
  layer_cache: Callable[[LayerCache], LayerCache]
  attend: Callable[..., tuple[Array, LayerCache]]


def _scores(q: Array, keys: Array) -> Array:
  """q [batch, kv, group, hd] . keys [batch, kv, hd, slots] -> float32 scores [batch, kv, group, slots].

  A sum of head_dim broadcast products along the slot axis, which XLA fuses into one elementwise
  loop that reads the keys once (instead of many tiny batched dots; docs/benchmarks.md).
  """
  q, keys = q.astype(jnp.float32), keys.astype(jnp.float32)
  scores = q[..., 0, None] * keys[:, :, None, 0, :]
  for h in range(1, q.shape[-1]):
    scores = scores + q[..., h, None] * keys[:, :, None, h, :]
  return scores


def fused_decode_attention(q: Array, k: Array, v: Array, cache: LayerCache, slot: Array,
                           visible: Array) -> tuple[Array, LayerCache]:
  """`einsum_decode_attention` over a cache with keys [batch, kv, head_dim, slots] and values [batch,
  kv, slots, head_dim]; the scores are `_scores`."""
  batch, _, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  cache = {"k": write_cache(cache["k"], k, slot, slots_last=True), "v": write_cache(cache["v"], v, slot)}
  keys, values = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
  scores = _scores(q.reshape(batch, kv_heads, heads // kv_heads, head_dim), keys) / math.sqrt(head_dim)
  scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  out = jnp.einsum("bkgs,bksh->bkgh", probs, values)
  return out.reshape(batch, 1, heads, head_dim), cache


XLA_DECODE = Decode(layout=STANDARD, layer_cache=lambda cache: cache, attend=einsum_decode_attention)
# XLA CPU: [out, in] weights, keys turned to [head_dim, slots] for `_scores` (docs/benchmarks.md).
CPU_DECODE = Decode(layout=OUT_IN, layer_cache=lambda cache: {"k": cache["k"].swapaxes(-1, -2),
                                                              "v": cache["v"]},
                    attend=fused_decode_attention)


# The dispatch.


@dataclasses.dataclass(frozen=True)
class Backend:
  """attend: the cache-free attention (q, k, v, segment_ids) -> out; decode: the decode step.
  platforms: where it runs; dtypes: the compute dtypes it needs (empty: any); packed_rows: whether a
  row may hold several segments (else one sequence then padding)."""

  attend: Callable[[Array, Array, Array, Array | None], Array]
  decode: Decode
  platforms: tuple[str, ...] = ("cpu", "gpu", "tpu")
  dtypes: tuple[str, ...] = ()
  packed_rows: bool = True


BACKENDS = {
    # jax.nn.dot_product_attention under masks; standard weights when decoding.
    "xla": Backend(attend=xla_attention, decode=XLA_DECODE),
    # Query-blocked causal attention with a hand-written backward (the masked blocks above the
    # diagonal are never computed); standard weights when decoding. Under the TPU compiler at
    # Qwen2.5-7B x 8 x 4096 on v5p:2x2x2 it needs 17.5 GiB per chip against 20.9 for "xla".
    "blocked": Backend(attend=blocked_attention, decode=XLA_DECODE),
    # Tuned for XLA CPU: the blocked attention, and decode on [out, in] weights with fused scores.
    "cpu": Backend(attend=blocked_attention, decode=CPU_DECODE),
    # cuDNN flash attention (bf16/f16) told each row's length; rows hold one sequence + padding.
    "cudnn": Backend(attend=cudnn_attention, decode=XLA_DECODE, platforms=("gpu",),
                     dtypes=("bfloat16", "float16"), packed_rows=False),
    # Splash attention (Pallas TPU flash kernel with segment ids); standard weights when decoding.
    "splash": Backend(attend=splash_attention, decode=XLA_DECODE, platforms=("tpu",)),
}
AUTO = {"cpu": "cpu", "gpu": "blocked", "tpu": "splash"}  # platform -> backend; others get "xla"
CHOICES = ("auto", *BACKENDS)
_PLATFORM_NAMES = {"cpu": "CPUs", "gpu": "GPUs", "tpu": "TPUs"}


def resolve(name: str, platform: str | None = None) -> str:
  """The backend that `name` (a `CHOICES` entry) means on platform (default: JAX's default backend)."""
  if name != "auto":
    return name
  return AUTO.get(platform or jax.default_backend(), "xla")


def backend(name: str) -> Backend:
  """The `Backend` of a `CHOICES` entry on JAX's default backend."""
  return BACKENDS[resolve(name)]


def check_config(name: str, dtype: str) -> None:
  """Raises ConfigError unless `name` is a choice whose backend can compute in dtype."""
  if name not in CHOICES:
    raise ConfigError(f"attention={name!r}; choose one of {CHOICES}")
  dtypes = BACKENDS[name].dtypes if name in BACKENDS else ()
  if dtypes and dtype not in dtypes:
    raise ConfigError(f"attention={name!r} needs dtype {' or '.join(dtypes)}, got dtype={dtype!r}; "
                      "set the dtype or use attention='auto'")


def check_backend(name: str, platform: str, packed_rows: bool) -> None:
  """Raises ConfigError (one line naming model.attention and the fix) where the backend that `name`
  means on platform cannot run, or cannot take packed rows (data.packing=True)."""
  chosen = BACKENDS[resolve(name, platform)]
  if platform not in chosen.platforms:
    where = " or ".join(_PLATFORM_NAMES.get(p, p) for p in chosen.platforms)
    raise ConfigError(f"model.attention={name!r} runs on {where} only (JAX's backend here is "
                      f"{platform!r}); set --config.model.attention=auto")
  if packed_rows and not chosen.packed_rows:
    raise ConfigError(f"model.attention={name!r} takes one sequence per row: set "
                      "--config.data.packing=False, or --config.model.attention=auto")
