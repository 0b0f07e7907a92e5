"""The one decoder of Qwen2/2.5, Qwen3 and Llama 3.x: training, prefill (with a KV cache) and decode.

`block` is the layer math, written once. The Flax `Decoder` declares the params (layers scanned with
`nn.scan`, so params are stacked on a leading "layers" axis and compile time does not grow with depth;
every param carries logical axis names, see `cftjax.parallel`) and runs `block` on the param tree
itself. The sampler's `decode_step` runs the same `block` over per-layer weights re-laid once per call
for the attention backend's decode layout (`cftjax.models.attention`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cftjax import parallel
from cftjax.models import attention, lora
from cftjax.models.config import ModelConfig

Array = jax.Array
KVCache = dict[str, Array]  # {"k": [layers, batch, kv_heads, slots, head_dim], "v": same}
# A param's shape, logical axes, initializer and optionally its dtype (default cfg.param_dtype).
Spec = tuple[tuple[int, ...], tuple[str, ...], Callable] | tuple[tuple[int, ...], tuple[str, ...], Callable, Any]


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


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
  """RMS-normalises x [..., dim] over its last axis in float32 and scales it by scale [dim]."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (scale.astype(jnp.float32) * x32).astype(x.dtype)


def embed(cfg: ModelConfig, embedding: Array, tokens: Array) -> Array:
  """tokens [batch, seq] -> embeddings [batch, seq, hidden] in the compute dtype.

  Rows are looked up in a float32 view of the table, so the gradient sums repeated tokens in float32
  (cast to the table's dtype once). Inside `parallel.use_mesh`, where the rows are split over every
  mesh axis that splits the table's "embed" dim (FSDP), the table stays sharded (`sharded_lookup`).
  """
  dtype = jnp.dtype(cfg.dtype)
  if parallel.entered() is not None:
    row_axes = parallel.split_axes(tokens.shape, ("batch", "seq"), "tokens")[0]
    if set(parallel.split_axes(embedding.shape, ("vocab", "embed"), "embedding")[1]) <= set(row_axes):
      return nn.with_logical_constraint(sharded_lookup(embedding, tokens, dtype), ("batch", "seq", "act_embed"))
  x = jnp.take(embedding.astype(jnp.float32), tokens, axis=0).astype(dtype)
  return nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))


def sharded_lookup(embedding: Array, tokens: Array, dtype) -> Array:
  """The rows of a table [vocab, hidden] sharded by its logical axes ("vocab", "embed") for tokens
  [batch, seq] whose rows are split over (at least) the "embed" axes, under `jax.shard_map`, without
  gathering the table.

  Each device gathers the token ids of the devices that share its "embed" slice index space (a few
  KiB), looks them up in its own slice (ids outside its vocab slice give zeros, summed over the
  "vocab" axes), then one all-to-all over the "embed" axes returns every row's full hidden vector to
  the device that owns the row. The backward pass is the reverse all-to-all and a float32
  scatter-add into the local slice only. A "vocab" axis that also splits the rows is gathered.
  """
  row_axes = parallel.split_axes(tokens.shape, ("batch", "seq"), "tokens")[0]
  vocab_axes, embed_axes = parallel.split_axes(embedding.shape, ("vocab", "embed"), "embedding")
  gather_vocab = tuple(a for a in vocab_axes if a in row_axes)
  split_vocab = tuple(a for a in vocab_axes if a not in row_axes)

  def local(table, ids):  # table [vocab / vocab axes, hidden / embed axes], ids [rows here, seq]
    if gather_vocab:
      table = jax.lax.all_gather(table, gather_vocab, axis=0, tiled=True)
    if embed_axes:
      ids = jax.lax.all_gather(ids, embed_axes, axis=0, tiled=True)
    size = table.shape[0]
    if split_vocab:
      ids = ids - jax.lax.axis_index(split_vocab) * size
    here = (ids >= 0) & (ids < size)
    x = jnp.take(table.astype(jnp.float32), jnp.clip(ids, 0, size - 1), axis=0)
    x = jnp.where(here[..., None], x, 0.0).astype(dtype)
    if split_vocab:
      x = jax.lax.psum(x, split_vocab)
    if embed_axes:
      x = jax.lax.all_to_all(x, embed_axes, split_axis=0, concat_axis=2, tiled=True)
    return x

  return jax.shard_map(local, mesh=parallel.current()[0],
                       in_specs=(P(vocab_axes or None, embed_axes or None), P(row_axes or None, None)),
                       out_specs=P(row_axes or None, None, None))(embedding, tokens)


def block(cfg: ModelConfig, layout: attention.Layout, layer: dict[str, Any], x: Array, cos: Array,
          sin: Array, attend: Callable, cache: attention.LayerCache | None):
  """One pre-norm decoder layer: grouped-query attention with optional QKV bias (Qwen2), QK-norm
  (Qwen3) and RoPE, then the SwiGLU MLP, each with a residual.

  x: [batch, seq, hidden]; layer: one layer's weights as `layout` stores them; cos, sin: [batch, seq,
  head_dim]; attend(q, k, v, cache) -> (out, cache) with q, out [batch, seq, heads, head_dim] and k, v
  [batch, seq, kv_heads, head_dim]. Returns (x, cache).
  """
  eps = cfg.rms_norm_eps
  attn = layer["attn"]
  q, k, v = layout.project_qkv(cfg, attn, rms_norm(x, layer["input_norm"]["scale"], eps))
  if cfg.qk_norm:
    q, k = rms_norm(q, attn["q_norm"]["scale"], eps), rms_norm(k, attn["k_norm"]["scale"], eps)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  out, cache = attend(q, k, v, cache)
  x = x + layout.project_out(cfg, attn, out)
  x = x + layout.mlp(layer["mlp"], rms_norm(x, layer["post_attn_norm"]["scale"], eps))
  return nn.with_logical_constraint(x, ("batch", "seq", "act_embed")), cache


def _norm_spec(dim: int, axis: str) -> dict[str, Spec]:
  return {"scale": ((dim,), (axis,), nn.initializers.ones)}


def layer_param_specs(cfg: ModelConfig) -> dict[str, Any]:
  """One layer's params as nested {name: Spec}, in creation order.

  Attention kernels keep the head axis explicit (q_kernel [embed, heads, head_dim], o_kernel
  [heads, head_dim, embed]) so the heads / kv_heads axes shard over `tensor` without reshapes.
  With cfg.lora_rank > 0 the targeted kernels get adapters (and a quantized base its codes and scales:
  `lora.extend_layer_specs`).
  """
  d, n, k, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  normal, zeros = nn.initializers.normal(0.02), nn.initializers.zeros
  attn = {}
  for name, heads, axis in (("q", n, "heads"), ("k", k, "kv_heads"), ("v", k, "kv_heads")):
    attn[f"{name}_kernel"] = ((d, heads, h), ("embed", axis, "head_dim"), normal)
    if cfg.attention_bias:
      attn[f"{name}_bias"] = ((heads, h), (axis, "head_dim"), zeros)
  if cfg.qk_norm:
    attn["q_norm"], attn["k_norm"] = _norm_spec(h, "head_dim"), _norm_spec(h, "head_dim")
  attn["o_kernel"] = ((n, h, d), ("heads", "head_dim", "embed"), normal)
  if cfg.o_proj_bias:
    attn["o_bias"] = ((d,), ("embed",), zeros)
  mlp = {"gate_kernel": ((d, f), ("embed", "mlp"), normal), "up_kernel": ((d, f), ("embed", "mlp"), normal),
         "down_kernel": ((f, d), ("mlp", "embed"), normal)}
  return lora.extend_layer_specs(cfg, {"input_norm": _norm_spec(d, "norm"), "attn": attn,
                                       "post_attn_norm": _norm_spec(d, "norm"), "mlp": mlp})


def declare(module: nn.Module, specs: Mapping[str, Any]) -> dict[str, Any]:
  """Creates the params of `specs` in `module` (a nested spec becomes a submodule of that name) and
  returns their values in the same nesting."""
  cfg = module.cfg
  params = {}
  for name, spec in specs.items():
    if isinstance(spec, Mapping):
      params[name] = Params(cfg, spec, name=name)()
    else:
      shape, axes, init = spec[:3]
      dtype = spec[3] if len(spec) > 3 else cfg.param_dtype
      params[name] = module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(dtype))
  return params


class Params(nn.Module):
  """A group of params (`declare`); calling it returns their values."""

  cfg: ModelConfig
  specs: Mapping[str, Any]

  @nn.compact
  def __call__(self) -> dict[str, Any]:
    return declare(self, self.specs)


class Block(nn.Module):
  """One layer's params and `block` over them; `nn.scan` maps it over the stacked layer params.

  Without a cache it attends with the configured backend (`segment_ids` [batch, seq] or None); with
  one (prefill) it writes the layer's K/V at slots = positions and attends over the cache. LoRA
  adapters apply unmerged (`lora.prepare_layer`); their dropout draws from the "dropout" rng stream
  when the caller passes one (training).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, layer_cache: attention.LayerCache | None, cos: Array, sin: Array,
               segment_ids: Array | None, positions: Array):
    cfg = self.cfg
    dropout_rng = self.make_rng("dropout") if cfg.lora_dropout and self.has_rng("dropout") else None
    layer = lora.prepare_layer(cfg, declare(self, layer_param_specs(cfg)), jnp.dtype(cfg.dtype), dropout_rng)
    if layer_cache is None:
      attend_rows = attention.backend(self.cfg.attention).attend
      attend = lambda q, k, v, cache: (attend_rows(q, k, v, segment_ids), None)
    else:
      attend = functools.partial(attention.cache_attention, positions=positions)
    return block(self.cfg, attention.STANDARD, layer, x, cos, sin, attend, layer_cache)


_REMAT_POLICY = {
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Decoder(nn.Module):
  """Token ids -> logits [batch, seq, vocab] (float32), or final hidden states with `return_hidden`.

  Call: `Decoder(cfg).apply({"params": p}, tokens, positions, segment_ids, cache=None)`; positions
  [batch, seq], or [1, seq] when every row has the same (default: 0 .. seq - 1 for every row).
  With a cache, returns `(logits, new_cache)`; see `init_cache` for the slot convention.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
               cache: KVCache | None = None, return_hidden: bool = False):
    cfg = self.cfg
    batch, seq = tokens.shape  # tokens: [batch, seq] int32
    if positions is None:
      positions = jnp.arange(seq, dtype=jnp.int32)[None, :]
    normal = nn.initializers.normal
    embedding = declare(self, {"embedding": ((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                             normal(1.0))})["embedding"]
    x = embed(cfg, embedding, tokens)
    cos, sin = rope_angles(cfg, positions)

    layer = Block
    if cfg.remat != "none":  # in a scan CSE cannot undo remat; unrolled, prevent_cse must keep it
      layer = nn.remat(Block, policy=_REMAT_POLICY[cfg.remat], prevent_cse=cfg.unroll_loops)
    layers = nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        unroll=cfg.num_layers if cfg.unroll_loops else 1,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, name="layers")
    x, cache = layers(x, cache, cos, sin, segment_ids, positions)
    final_norm = Params(cfg, _norm_spec(cfg.hidden_size, "norm"), name="final_norm")()
    x = rms_norm(x, final_norm["scale"], cfg.rms_norm_eps)
    if return_hidden:
      return x if cache is None else (x, cache)
    if cfg.tie_embeddings:
      head = embedding.T
    else:
      head = declare(self, {"lm_head": ((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                        normal(0.02))})["lm_head"]
    logits = attention.STANDARD.logits(head, x)
    return logits if cache is None else (logits, cache)


def lm_head_kernel(cfg: ModelConfig, params: dict[str, Any]) -> Array:
  """The output projection [hidden, vocab] (the transposed embedding when tied)."""
  return params["embedding"].T if cfg.tie_embeddings else params["lm_head"]


def token_log_probs(logits: Array, targets: Array, temperature: float | Array = 1.0) -> Array:
  """log softmax(logits / temperature) at targets, float32; logits [..., vocab], targets [...] int."""
  scaled = logits.astype(jnp.float32) / temperature
  picked = jnp.take_along_axis(scaled, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(scaled, axis=-1)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  """An empty KV cache: K/V of position p of row b live in slot p ([layers, batch, kv, max_len, hd]).

  KV heads come before slots so that attention reads each (row, KV head) block of the cache as one
  contiguous matrix, with no transposed copy of the cache per step.
  """
  shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  zeros = lambda: nn.with_logical_constraint(jnp.zeros(shape, dtype), ("layers", *attention.CACHE_AXES))
  return {"k": zeros(), "v": zeros()}


# Decoding one token per row, on the decode layout of the configured attention backend.

DecodeWeights = dict[str, Any]  # {"embedding", "final_norm", "lm_head", "layers": one tree per layer}


def decode_weights(cfg: ModelConfig, decode: attention.Decode, params: dict[str, Any]) -> DecodeWeights:
  """Params (plain arrays) re-laid for `decode.layout`, one tree per layer: call once per generation,
  under jit. The layers are unrolled in `decode_step`, so no step slices stacked weights. Under a
  mesh the weights are first gathered over the batch's mesh axes (`gathered_for_decode`)."""
  dtype, layout = jnp.dtype(cfg.dtype), decode.layout
  params = gathered_for_decode(cfg, params)
  num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  layers = [jax.tree.map(lambda p, i=i: p[i], params["layers"]) for i in range(num_layers)]
  layers = jax.tree_util.tree_map_with_path(_materialised_if_norm_scale, layers)
  return {
      "embedding": params["embedding"],
      "final_norm": params["final_norm"]["scale"],
      "lm_head": layout.head_weights(lm_head_kernel(cfg, params), dtype),
      "layers": [layout.layer_weights(cfg, lora.prepare_layer(cfg, layer, dtype), dtype) for layer in layers],
  }


def _materialised_if_norm_scale(path, w: Array) -> Array:
  """A layer's norm scale (a leaf named "scale") behind an optimization barrier, so it is sliced from
  the stacked params once per `generate` call. Otherwise the TPU compiler keeps the [1, dim] slice in
  the decode loop and re-lays it to [dim] with a reduce in every step, twice a layer (docs/benchmarks.md)."""
  return jax.lax.optimization_barrier(w) if path[-1].key == "scale" else w


def gathered_for_decode(cfg: ModelConfig, params: dict[str, Any]) -> dict[str, Any]:
  """Params as the decode loop reads them: floating weights in cfg.dtype (norm and quantisation scales
  as stored) and, under a mesh, whole over the mesh axes that split the batch (FSDP), still split
  over "tensor" (`parallel.without_batch_axes`). One all-gather per weight per `generate` call instead
  of one per decode step; each chip then holds the compute-dtype weights divided by the tensor axis.
  Without a mesh: only the cast."""
  params = attention.cast_weights(params, jnp.dtype(cfg.dtype))
  if parallel.entered() is None:
    return params

  def place(path, w, names):
    sharding = parallel.logical_sharding(w.shape, tuple(names), parallel.path_name(path))
    return jax.lax.with_sharding_constraint(w, parallel.without_batch_axes(sharding))

  return jax.tree_util.tree_map_with_path(place, params, param_logical_axes(cfg))


def decode_caches(decode: attention.Decode, cache: KVCache) -> list[attention.LayerCache]:
  """The prefill's stacked cache -> one cache per layer in `decode`'s layout (once per generation)."""
  return [decode.layer_cache({"k": k, "v": v}) for k, v in zip(cache["k"], cache["v"], strict=True)]


def decode_logits(decode: attention.Decode, weights: DecodeWeights, hidden: Array) -> Array:
  """hidden [batch, hidden] after the final norm -> next-token logits [batch, vocab] float32."""
  return decode.layout.logits(weights["lm_head"], hidden)


def decode_step(cfg: ModelConfig, decode: attention.Decode, weights: DecodeWeights, tokens: Array,
                positions: Array, slot: Array, visible: Array, caches: list[attention.LayerCache]):
  """One token per row through `block`: (next-token logits [batch, vocab] float32, updated caches).

  tokens, positions: [batch] int32 (positions give the rotary angles); every row's K/V go to cache
  slot `slot` (int32 scalar) and each row attends to its `visible` slots ([batch, slots] bool, the
  new slot included): rows of different lengths share one write position, so the cache is updated
  in place without a per-row scatter. weights, caches: from `decode_weights` and `decode_caches`.
  """
  positions = positions[:, None]
  x = embed(cfg, weights["embedding"], tokens[:, None])  # [batch, 1, hidden]
  cos, sin = rope_angles(cfg, positions)
  attend = functools.partial(decode.attend, slot=slot, visible=visible)
  new_caches = []
  for layer, cache in zip(weights["layers"], caches, strict=True):
    x, cache = block(cfg, decode.layout, layer, x, cos, sin, attend, cache)
    new_caches.append(cache)
  hidden = rms_norm(x[:, 0], weights["final_norm"], cfg.rms_norm_eps)
  return decode_logits(decode, weights, hidden), new_caches


def init_params(cfg: ModelConfig, rng: Array) -> dict[str, Any]:
  """Freshly initialised, unboxed params (plain arrays); traced outside the current mesh, like
  `abstract_params`."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  with parallel.outside_mesh():
    return nn.unbox(Decoder(cfg).init(rng, tokens)["params"])


def abstract_params(cfg: ModelConfig) -> dict[str, Any]:
  """Boxed `jax.ShapeDtypeStruct` params carrying logical axis names; no memory is allocated. Traced
  outside the current mesh: a one-token dummy batch has nothing to place."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  with parallel.outside_mesh():
    return jax.eval_shape(lambda t: Decoder(cfg).init(jax.random.key(0), t), tokens)["params"]


def param_logical_axes(cfg: ModelConfig) -> dict[str, Any]:
  """The tree of logical axis names (a `PartitionSpec` of names per param)."""
  return nn.get_partition_spec(abstract_params(cfg))
