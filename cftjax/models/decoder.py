"""The Flax Linen decoder shared by Qwen2/2.5, Qwen3 and Llama 3.x, with an optional KV cache.

Layers are scanned (`nn.scan`) so params are stacked on a leading "layers" axis and compile time does
not grow with depth. Every param carries logical axis names (see `cftjax.parallel`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cftjax.models.config import ModelConfig

Array = jax.Array
KVCache = dict[str, Array]  # {"k": [layers, batch, kv_heads, slots, head_dim], "v": same}


def _dtype(name: str):
  return jnp.dtype(name)


def rope_inv_freq(cfg: ModelConfig) -> Array:
  """Inverse RoPE frequencies [head_dim // 2], with Llama 3 frequency scaling when configured."""
  exponents = jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta**exponents)
  if cfg.rope_scaling is None:
    return inv_freq
  s = cfg.rope_scaling
  factor = s["factor"]
  low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
  old_len = s["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(is_medium, smoothed, scaled)


def rope_angles(cfg: ModelConfig, positions: Array) -> tuple[Array, Array]:
  """cos and sin of the rotation angles, each [batch, seq, head_dim] float32."""
  angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates x [batch, seq, heads, head_dim] by the half-split (HF "rotate_half") convention."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...], init):
  cfg = module.cfg
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, _dtype(cfg.param_dtype))


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
  """RMS-normalises x [..., dim] over its last axis in float32 and scales it by scale [dim]."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (scale.astype(jnp.float32) * x32).astype(x.dtype)


class RMSNorm(nn.Module):
  cfg: ModelConfig
  dim: int
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", (self.dim,), (self.axis_name,), nn.initializers.ones)
    return rms_norm(x, scale, self.cfg.rms_norm_eps)


def attention_mask(q_positions: Array, k_positions: Array, q_segments: Array | None,
                   k_segments: Array | None) -> Array:
  """Causal (and same-segment) mask [batch, 1, q_len, k_len]: key position <= query position."""
  mask = k_positions[:, None, :] <= q_positions[:, :, None]
  if q_segments is not None:
    mask &= q_segments[:, :, None] == k_segments[:, None, :]
  return mask[:, None]


MIN_QUERY_BLOCK = 64  # causal attention splits queries into blocks of at least this many rows
MAX_QUERY_BLOCKS = 8


def causal_attention(q: Array, key: Array, value: Array, mask: Array) -> Array:
  """Masked grouped-query attention under a mask that is causal by index, skipping the masked half.

  q: [batch, seq, heads, head_dim], key/value: [batch, seq, kv_heads, head_dim], mask: [batch, 1, seq,
  seq] with mask[..., i, j] False wherever j > i (segment masks may clear more). Queries are split
  into up to MAX_QUERY_BLOCKS blocks and block b attends only to keys before its end, so the blocks
  above the diagonal (all masked) are never computed: (n + 1) / 2n of the full work for n blocks. Each
  block's softmax still covers every key it may see, so the result is exact. Each block runs as
  `grouped_attention`; on CPU at 8 x 512 tokens forward + backward ran 1.55x faster than the previous
  form, 4 blocks through `jax.nn.dot_product_attention` (docs/benchmarks.md).
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
  Scores and softmax are float32. The hand-written backward pass reuses the saved probabilities; on
  CPU it ran the blocks faster than XLA's autodiff of the same forward (196 vs 220 ms per layer at
  8 x 512 tokens, docs/benchmarks.md).
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

  q: [batch, seq, heads, head_dim], key/value: [batch, seq, kv_heads, head_dim], seq_lengths: [batch]
  int32 or None (no padding). No mask array is built: cuDNN's flash kernel ("cudnn") skips the tiles
  above the diagonal and past each length. Padded query rows are not meaningful; losses mask them.
  """
  return jax.nn.dot_product_attention(q, key, value, is_causal=True, query_seq_lengths=seq_lengths,
                                      key_value_seq_lengths=seq_lengths, implementation=implementation)


def sequence_lengths(segment_ids: Array) -> Array:
  """Tokens per row [batch] int32 of rows laid out as one segment then padding (ids 1..1 0..0)."""
  return jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)


class Attention(nn.Module):
  """Grouped-query attention with optional QKV bias (Qwen2) and QK-norm (Qwen3)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array | None, seq_lengths: Array | None,
               cache: KVCache | None, positions: Array) -> tuple[Array, KVCache | None]:
    cfg = self.cfg
    dt = _dtype(cfg.dtype)
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = nn.initializers.normal(0.02)

    def project(name, heads, head_axis):
      w = _param(self, f"{name}_kernel", (d, heads, h), ("embed", head_axis, "head_dim"), init)
      y = jnp.einsum("btd,dnh->btnh", x, w.astype(dt))
      if cfg.attention_bias:
        b = _param(self, f"{name}_bias", (heads, h), (head_axis, "head_dim"), nn.initializers.zeros)
        y = y + b.astype(dt)
      return y

    q, key, value = project("q", n, "heads"), project("k", k, "kv_heads"), project("v", k, "kv_heads")
    if cfg.qk_norm:
      q = RMSNorm(cfg, h, "head_dim", name="q_norm")(q)
      key = RMSNorm(cfg, h, "head_dim", name="k_norm")(key)
    q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)

    if cache is not None:
      cache = {"k": write_cache(cache["k"], key, positions[:, 0]),
               "v": write_cache(cache["v"], value, positions[:, 0])}
      key, value = (cache[name].swapaxes(1, 2).astype(dt) for name in ("k", "v"))

    if cache is None and cfg.attention == "cudnn":
      out = padded_causal_attention(q, key, value, seq_lengths, implementation="cudnn")
    elif mask is None:  # one causal segment per row, no padding, no cache
      out = jax.nn.dot_product_attention(q, key, value, is_causal=True)
    elif cache is None:  # packed segments: causal by index within the row
      out = causal_attention(q, key, value, mask)
    else:
      out = jax.nn.dot_product_attention(q, key, value, mask=mask)
    wo = _param(self, "o_kernel", (n, h, d), ("heads", "head_dim", "embed"), init)
    y = jnp.einsum("btnh,nhd->btd", out, wo.astype(dt))
    if cfg.o_proj_bias:
      y = y + _param(self, "o_bias", (d,), ("embed",), nn.initializers.zeros).astype(dt)
    return y, cache


class MLP(nn.Module):
  """SwiGLU feed-forward block."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    dt = _dtype(cfg.dtype)
    d, f = cfg.hidden_size, cfg.intermediate_size
    init = nn.initializers.normal(0.02)
    gate = _param(self, "gate_kernel", (d, f), ("embed", "mlp"), init)
    up = _param(self, "up_kernel", (d, f), ("embed", "mlp"), init)
    down = _param(self, "down_kernel", (f, d), ("mlp", "embed"), init)
    return swiglu_down(matmul_2d(x, gate.astype(dt)), matmul_2d(x, up.astype(dt)), down.astype(dt))


@functools.partial(jax.checkpoint, prevent_cse=False)
def swiglu_down(gate: Array, up: Array, down: Array) -> Array:
  """(silu(gate) * up) @ down for gate, up [batch, seq, intermediate] and down [intermediate, hidden].

  Rematerialised: autodiff keeps only gate and up (plus down). The activation product, silu and its
  sigmoid are recomputed in the backward pass in one elementwise pass instead of being stored per
  layer: 2 instead of 6 [tokens, intermediate] arrays (peak host memory of the benchmark's CFT step
  5.4 -> 4.0 GB; docs/benchmarks.md).
  """
  hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
  return matmul_2d(hidden, down)


def matmul_2d(x: Array, w: Array) -> Array:
  """x [..., in] @ w [in, out] as one [rows, in] @ [in, out] product.

  Same math as `x @ w`; on XLA CPU the 3-D form makes the backward pass transpose [B, T, F]
  activations for the weight gradients, and the 2-D form runs the SwiGLU MLP's forward + backward
  ~1.45x faster (docs/benchmarks.md).
  """
  return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


class Block(nn.Module):
  """One pre-norm decoder layer; `nn.scan` maps it over the stacked layer params."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, layer_cache: KVCache | None, cos: Array, sin: Array,
               mask: Array | None, seq_lengths: Array | None,
               positions: Array) -> tuple[Array, KVCache | None]:
    cfg = self.cfg
    attn_out, layer_cache = Attention(cfg, name="attn")(
        RMSNorm(cfg, cfg.hidden_size, name="input_norm")(x), cos, sin, mask, seq_lengths, layer_cache,
        positions)
    x = x + attn_out
    x = x + MLP(cfg, name="mlp")(RMSNorm(cfg, cfg.hidden_size, name="post_attn_norm")(x))
    x = nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))
    return x, layer_cache


_REMAT_POLICY = {
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def embed(cfg: ModelConfig, embedding: Array, tokens: Array) -> Array:
  """tokens [batch, seq] -> embeddings [batch, seq, hidden] in the compute dtype."""
  # Gathering from a table sharded on "embed" forces XLA to replicate it; unshard that dim first.
  x = jnp.take(nn.with_logical_constraint(embedding, ("vocab", None)), tokens, axis=0)
  return nn.with_logical_constraint(x.astype(_dtype(cfg.dtype)), ("batch", "seq", "act_embed"))


def write_cache(layer_cache: Array, new: Array, start: Array, *, slots_last: bool = False) -> Array:
  """Writes new [batch, seq, kv_heads, head_dim] into one layer's cache [batch, kv_heads, slots, head_dim]
  (with slots_last: [batch, kv_heads, head_dim, slots], the decode loop's keys) at slots
  start[b] .. start[b] + seq - 1 of each row b (start: [batch] int32)."""
  new = (new.transpose(0, 2, 3, 1) if slots_last else new.swapaxes(1, 2)).astype(layer_cache.dtype)
  write_row = lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=2 if slots_last else 1)
  return jax.vmap(write_row)(layer_cache, new, start)


def cache_mask(positions: Array, num_slots: int) -> Array:
  """Mask [batch, 1, seq, slots] of queries at `positions` [batch, seq] over cache slots (slot i holds
  position i of its row)."""
  slots = jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32), (positions.shape[0], num_slots))
  return attention_mask(positions, slots, None, None)


class Decoder(nn.Module):
  """Token ids -> logits [batch, seq, vocab] (float32), or final hidden states with `return_hidden`.

  Call: `Decoder(cfg).apply({"params": p}, tokens, positions, segment_ids, cache=None)`.
  With a cache, returns `(logits, new_cache)`; see `init_cache` for the slot convention.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
               cache: KVCache | None = None, return_hidden: bool = False):
    cfg = self.cfg
    dt = _dtype(cfg.dtype)
    batch, seq = tokens.shape  # tokens: [batch, seq] int32
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    embedding = _param(self, "embedding", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                       nn.initializers.normal(1.0))
    x = embed(cfg, embedding, tokens)
    cos, sin = rope_angles(cfg, positions)

    mask = seq_lengths = None
    if cache is not None:
      mask = cache_mask(positions, cache["k"].shape[3])
    elif segment_ids is not None and cfg.attention == "cudnn":
      seq_lengths = sequence_lengths(segment_ids)
    elif segment_ids is not None:
      index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
      mask = attention_mask(index, index, segment_ids, segment_ids)

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=_REMAT_POLICY[cfg.remat], prevent_cse=False)
    layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, name="layers")
    x, cache = layers(x, cache, cos, sin, mask, seq_lengths, positions)
    x = RMSNorm(cfg, cfg.hidden_size, name="final_norm")(x)
    if return_hidden:
      return x if cache is None else (x, cache)
    if cfg.tie_embeddings:
      head = embedding.T
    else:
      head = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                    nn.initializers.normal(0.02))
    logits = jnp.einsum("btd,dv->btv", x, head.astype(dt)).astype(jnp.float32)
    return logits if cache is None else (logits, cache)


def unstack_layers(layers: dict[str, Any]) -> list[dict[str, Any]]:
  """Scanned layer params (each leaf [layers, ...]) -> one param tree per layer."""
  num_layers = jax.tree.leaves(layers)[0].shape[0]
  return [jax.tree.map(lambda p, i=i: p[i], layers) for i in range(num_layers)]


def lm_head_kernel(cfg: ModelConfig, params: dict[str, Any]) -> Array:
  """The output projection [hidden, vocab] (the transposed embedding when tied)."""
  return params["embedding"].T if cfg.tie_embeddings else params["lm_head"]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  """An empty KV cache: K/V of position p of row b live in slot p ([layers, batch, kv, max_len, hd]).

  KV heads come before slots so that attention reads each (row, KV head) block of the cache as one
  contiguous matrix, with no transposed copy of the cache per step (the sampler's decode loop turns
  the keys to [head_dim, slots] once per call: `decode.decode_caches`).
  """
  shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def init_params(cfg: ModelConfig, rng: Array) -> dict[str, Any]:
  """Freshly initialised, unboxed params (plain arrays)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return nn.unbox(Decoder(cfg).init(rng, tokens)["params"])


def abstract_params(cfg: ModelConfig) -> dict[str, Any]:
  """Boxed `jax.ShapeDtypeStruct` params carrying logical axis names; no memory is allocated."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: Decoder(cfg).init(jax.random.key(0), t), tokens)["params"]


def param_logical_axes(cfg: ModelConfig) -> dict[str, Any]:
  """The tree of logical axis names (a `PartitionSpec` of names per param)."""
  return nn.get_partition_spec(abstract_params(cfg))
