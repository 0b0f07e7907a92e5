"""The sampler's one-token decode step, on weights laid out for it once per `generate` call.

`decode_weights` casts the params to the compute dtype and stores every projection per layer as a
2-D [out, in] matrix; `decode_step` runs one token per row through them with a per-layer KV cache.
Same math as `Decoder` with a cache (tests: logits within 1e-4 for qwen2, qwen3 and llama).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from cftjax.models.config import ModelConfig
from cftjax.models.decoder import (KVCache, apply_rope, embed, lm_head_kernel, rms_norm, rope_angles,
                                   unstack_layers, write_cache)

Array = jax.Array
DecodeWeights = dict[str, Any]  # {"embedding", "final_norm", "lm_head": [vocab, hidden], "layers": [...]}


def _out_in(kernel: Array, in_dims: int, dtype) -> Array:
  """A kernel [in..., out...] whose first `in_dims` axes are inputs -> [out, in] in dtype."""
  rows = math.prod(kernel.shape[:in_dims])
  return kernel.reshape(rows, -1).T.astype(dtype)


def _layer_weights(cfg: ModelConfig, layer: dict[str, Any], dtype) -> dict[str, Array]:
  """One layer's decode weights; q/k/v and gate/up are stacked on the output axis (one dot each)."""
  attn, mlp = layer["attn"], layer["mlp"]
  weights = {
      "input_norm": layer["input_norm"]["scale"], "post_attn_norm": layer["post_attn_norm"]["scale"],
      "qkv": jnp.concatenate([_out_in(attn[f"{name}_kernel"], 1, dtype) for name in "qkv"]),
      "o": _out_in(attn["o_kernel"], 2, dtype),
      "gate_up": jnp.concatenate([_out_in(mlp[f"{name}_kernel"], 1, dtype) for name in ("gate", "up")]),
      "down": _out_in(mlp["down_kernel"], 1, dtype),
  }
  if cfg.attention_bias:
    weights["qkv_bias"] = jnp.concatenate([attn[f"{name}_bias"].reshape(-1) for name in "qkv"]).astype(dtype)
  if cfg.o_proj_bias:
    weights["o_bias"] = attn["o_bias"].astype(dtype)
  if cfg.qk_norm:
    weights["q_norm"], weights["k_norm"] = attn["q_norm"]["scale"], attn["k_norm"]["scale"]
  return weights


def decode_weights(cfg: ModelConfig, params: dict[str, Any]) -> DecodeWeights:
  """The decode layout of `Decoder` params (plain arrays): call once per generation, under jit.

  Why [out, in]: at decode batch sizes a [batch, in] @ [in, out] product is a thin matrix times a
  big one; XLA CPU's kernels stream the big operand 1.5-3x faster when it is the row-major left
  operand ([out, in] @ [in, batch]; docs/benchmarks.md). The copy costs one pass over the weights
  per call, and casting to the compute dtype here also spares the loop a cast per step.
  """
  dtype = jnp.dtype(cfg.dtype)
  return {
      "embedding": params["embedding"],
      "final_norm": params["final_norm"]["scale"],
      "lm_head": lm_head_kernel(cfg, params).T.astype(dtype),  # tied: the embedding table itself
      "layers": [_layer_weights(cfg, layer, dtype) for layer in unstack_layers(params["layers"])],
  }


def decode_caches(cache: KVCache) -> list[KVCache]:
  """The prefill's stacked cache ([layers, batch, kv, slots, hd]) -> one {"k", "v"} per layer for
  `decode_step`: keys [batch, kv, head_dim, slots], values [batch, kv, slots, head_dim].

  Why keys turn: `_scores` works along the slot axis, which [hd, slots] keys hold contiguously. It
  costs one copy of the keys per `generate` call.
  """
  return [{"k": k.swapaxes(-1, -2), "v": v} for k, v in zip(cache["k"], cache["v"], strict=True)]


def _scores(q: Array, keys: Array) -> Array:
  """q [batch, kv, group, hd] . keys [batch, kv, hd, slots] -> float32 scores [batch, kv, group, slots].

  A sum of head_dim broadcast products along the slot axis, which XLA fuses into one elementwise
  loop that reads the keys once. At batch 8 a layer's scores are 16 small [group, hd] @ [hd, slots]
  products; XLA CPU ran them as a batched dot 5x slower (docs/benchmarks.md).
  """
  q, keys = q.astype(jnp.float32), keys.astype(jnp.float32)
  scores = q[..., 0, None] * keys[:, :, None, 0, :]
  for h in range(1, q.shape[-1]):
    scores = scores + q[..., h, None] * keys[:, :, None, h, :]
  return scores


def linear(x: Array, weight: Array) -> Array:
  """x [batch, in] times weight [out, in] -> [batch, out], computed as (weight @ x.T).T.

  The optimization barriers keep XLA from folding the two small transposes into the dot, which
  would turn it back into the [batch, in] @ [in, out] form that `decode_weights` avoids.
  """
  x_t = jax.lax.optimization_barrier(x.T)
  return jax.lax.optimization_barrier(weight @ x_t).T


def lm_logits(weights: DecodeWeights, hidden: Array) -> Array:
  """hidden [batch, hidden] after the final norm -> next-token logits [batch, vocab] float32."""
  return linear(hidden, weights["lm_head"]).astype(jnp.float32)


def _attention(cfg: ModelConfig, layer: dict[str, Array], x: Array, cos: Array, sin: Array,
               visible: Array, positions: Array, cache: KVCache) -> tuple[Array, KVCache]:
  """x [batch, hidden] (normed) -> (attention output [batch, hidden], cache with this token written)."""
  batch = x.shape[0]
  n, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  qkv = linear(x, layer["qkv"])
  if cfg.attention_bias:
    qkv = qkv + layer["qkv_bias"]
  q, k, v = jnp.split(qkv, [n * hd, (n + kv) * hd], axis=1)
  q, k, v = q.reshape(batch, 1, n, hd), k.reshape(batch, 1, kv, hd), v.reshape(batch, 1, kv, hd)
  if cfg.qk_norm:
    q, k = rms_norm(q, layer["q_norm"], cfg.rms_norm_eps), rms_norm(k, layer["k_norm"], cfg.rms_norm_eps)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  cache = {"k": write_cache(cache["k"], k, positions, slots_last=True),
           "v": write_cache(cache["v"], v, positions)}
  keys, values = cache["k"].astype(x.dtype), cache["v"].astype(x.dtype)  # [b, kv, hd, s], [b, kv, s, hd]
  q = q.reshape(batch, kv, n // kv, hd)
  scores = _scores(q, keys) / math.sqrt(hd)
  scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
  out = jnp.einsum("bkgs,bksh->bkgh", probs, values).reshape(batch, n * hd)
  out = linear(out, layer["o"])
  if cfg.o_proj_bias:
    out = out + layer["o_bias"]
  return out, cache


def decode_step(cfg: ModelConfig, weights: DecodeWeights, tokens: Array, positions: Array,
                caches: list[KVCache]) -> tuple[Array, list[KVCache]]:
  """One token per row through the decoder: (next-token logits [batch, vocab] float32, updated caches).

  tokens, positions: [batch] int32; a token's K/V go to cache slot = its position, and it attends to
  slots <= its position. caches: one {"k", "v"} per layer, laid out by `decode_caches`. Layers are
  unrolled over per-layer weights and caches: a scan would copy each layer's slice of stacked weights
  and caches at every step.
  """
  eps = cfg.rms_norm_eps
  x = embed(cfg, weights["embedding"], tokens[:, None])[:, 0]  # [batch, hidden]
  cos, sin = rope_angles(cfg, positions[:, None])
  num_slots = caches[0]["k"].shape[3]
  visible = jnp.arange(num_slots, dtype=jnp.int32)[None, :] <= positions[:, None]  # [batch, slots]
  new_caches = []
  for layer, cache in zip(weights["layers"], caches, strict=True):
    attn_out, cache = _attention(cfg, layer, rms_norm(x, layer["input_norm"], eps), cos, sin, visible,
                                 positions, cache)
    x = x + attn_out
    h = rms_norm(x, layer["post_attn_norm"], eps)
    gate, up = jnp.split(linear(h, layer["gate_up"]), 2, axis=1)
    x = x + linear(jax.nn.silu(gate) * up, layer["down"])
    new_caches.append(cache)
  return lm_logits(weights, rms_norm(x, weights["final_norm"], eps)), new_caches
