"""Training losses: chunked cross-entropy and token log-probs from hidden states, GRPO advantages,
the policy losses (GRPO / Dr. GRPO clipped surrogate, GSPO, GSPO-token, CISPO, Critique-GRPO's shaped
off-policy tokens), truncated importance weights, KL estimators and (sum, count) aggregation for
global normalisation; and the model's forward pass into those sums (`ce_sums`, `completion_log_probs`)."""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cftjax import parallel
from cftjax.models import Decoder, ModelConfig, attention, lm_head_kernel
from cftjax.train import state as state_lib

Array = jax.Array
# The CFT batch: inputs, targets (int32), loss_mask (float32), positions, segment_ids (int32, 0 =
# padding), all [batch, seq].
CFT_BATCH_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")

AGGREGATION_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
ADVANTAGE_SCALES = ("group_std", "batch_std", "none")
KL_KINDS = ("k1", "k3")


# ----------------------------------------------------------------------------------------------
# Per-token statistics of logits (shared by the chunked and unchunked paths).


@dataclasses.dataclass(frozen=True)
class VocabShard:
  """Which part of the vocabulary a device's logits [..., V_local] cover: the vocab is split in equal
  slices over the mesh axes `axes`, the first major (inside `jax.shard_map`; empty: the logits cover
  the whole vocab). Reductions over the vocab combine the slices with collectives over `axes`.
  `row_axes`, a suffix of `axes`: axes whose devices gathered one another's rows for these logits; the
  rows' hidden-state gradient is not summed over them here (the gather's transpose sums it)."""

  axes: tuple[str, ...] = ()
  row_axes: tuple[str, ...] = ()

  def start(self, size: int) -> Array:
    return jax.lax.axis_index(self.axes) * size if self.axes else jnp.int32(0)

  def max(self, x: Array) -> Array:
    """The max over the slices, a constant under differentiation."""
    return _constant_collective(jax.lax.pmax, self.axes, x) if self.axes else jax.lax.stop_gradient(x)

  def sum(self, x: Array) -> Array:
    return jax.lax.psum(x, self.axes) if self.axes else x

  def hidden_sum(self, x: Array) -> Array:
    """x (a hidden-state gradient from this vocab slice) summed over the slices of the same rows."""
    axes = tuple(a for a in self.axes if a not in self.row_axes)
    return jax.lax.psum(x, axes) if axes else x


WHOLE_VOCAB = VocabShard()


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _constant_collective(collective, axes, x):
  """collective(x, axes) with a zero derivative (JAX has no differentiation rule for pmax)."""
  return collective(x, axes)


@_constant_collective.defjvp
def _constant_collective_jvp(collective, axes, primals, tangents):
  del tangents
  out = _constant_collective(collective, axes, *primals)
  return out, jnp.zeros_like(out)


def _softmax_stats(logits: Array, targets: Array, vocab: VocabShard) -> dict[str, Array]:
  """logits: [..., V_local] float32, targets: [...] (full-vocab ids) -> per-token, over the whole vocab:
  log_prob (of the target), log_z (logsumexp), entropy, target_logit and peak (the largest logit).

  Two passes over the logits: their max, then the sums of exp(s), s x exp(s) (s = logits - peak) and
  the target's logit, which the compiler fuses into one; entropy = log(sum exp(s)) - sum s exp(s) /
  sum exp(s)."""
  size = logits.shape[-1]
  peak = vocab.max(jnp.max(logits, axis=-1))
  shifted = logits - peak[..., None]
  exp = jnp.exp(shifted)
  sum_exp = vocab.sum(jnp.sum(exp, axis=-1))
  local = targets.astype(jnp.int32) - vocab.start(size)
  # A masked sum, not a gather: its gradient is a select, where a gather's is a scatter-add (which
  # the TPU cost model prices at a negative time). A target in another slice matches nothing here.
  is_target = jnp.arange(size, dtype=jnp.int32) == local[..., None]
  target_logit = vocab.sum(jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1))
  log_sum = jnp.log(sum_exp)
  log_z = peak + log_sum
  return {"log_prob": target_logit - log_z, "log_z": log_z, "target_logit": target_logit, "peak": peak,
          "entropy": log_sum - vocab.sum(jnp.sum(exp * shifted, axis=-1)) / sum_exp}


def _token_stats(logits: Array, targets: Array, vocab: VocabShard = WHOLE_VOCAB) -> dict[str, Array]:
  """logits: [..., V_local] float32, targets: [...] -> per-token log_prob, log_z, entropy and correct
  (1.0 where the target's logit is the largest, ties included: argmax == target without an argmax
  pass)."""
  stats = _softmax_stats(logits, targets, vocab)
  correct = jax.lax.stop_gradient((stats["target_logit"] >= stats["peak"]).astype(jnp.float32))
  return {"log_prob": stats["log_prob"], "log_z": stats["log_z"], "entropy": stats["entropy"], "correct": correct}


# ----------------------------------------------------------------------------------------------
# Chunking over tokens: logits exist for one chunk at a time, in forward and (recomputed) backward.

StatsFn = Callable[[Array, Array, VocabShard], dict[str, Array]]


@dataclasses.dataclass(frozen=True)
class TokenLoss:
  """The loss sum(weights x per_token(stats)) of `_map_token_chunks`: weights [B, T] float32,
  per_token maps the per-token stats of a chunk to its per-token loss [b, s]."""

  weights: Array
  per_token: Callable[[dict[str, Array]], Array]


def _map_token_chunks(
    stats_fn: StatsFn,
    hidden: Array,
    lm_head: Array,
    targets: Array,
    chunk_size: int,
    logits_dtype=jnp.float32,
    temperature: float = 1.0,
    unroll: bool = False,
    loss: TokenLoss | None = None,
) -> dict[str, Array]:
  """Applies stats_fn(logits [b, s, V] f32, targets [b, s], vocab) to chunks of about chunk_size
  tokens per device. `unroll` writes the chunk loops out as straight-line code
  (`ModelConfig.unroll_loops`).

  hidden: [B, T, D], lm_head: [D, V], targets: [B, T] -> dict of [B, T] float32 arrays, plus, given
  `loss`, "loss_sum": the scalar sum(loss.weights x loss.per_token(stats)). Its gradients are taken in
  the forward pass, chunk by chunk, and the stats are then constants under differentiation
  (`_local_token_chunks`).
  Inside `parallel.use_mesh`, where the rows are split over (at least) the mesh axes of the head's
  "embed" dim (FSDP), this runs under `jax.shard_map` as vocab-parallel cross-entropy (vocab
  reductions combined with collectives), in whichever of two ways moves fewer bytes:
  - rows gathered (`_rows_gathered`): the devices of one head "embed" group each hold the whole head
    for 1 / group of their vocab slice (one all-to-all of the head's shard), all-gather the group's
    hidden rows and compute every row's logits on that slice; the hidden gradient goes back as one
    all-to-all reduce-scatter and the head's stays on its device. Moves 2 x tokens x hidden per step.
  - head gathered: each device gathers the head's "embed" dim once and computes its own rows' logits
    on its vocab slice; the head gradient goes back as one all-to-all reduce-scatter. Moves 2 x hidden x
    vocab per step, less when the group's tokens outnumber the vocab slice.
  A chunk holds every row a device computes and about chunk_size // (this device's rows) positions (T
  is padded to a multiple of it): chunk_size tokens x the vocab slice of logits at a time.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  batch, _, dim = hidden.shape
  if lm_head.shape[0] != dim:
    raise ValueError(
        f"lm_head is {lm_head.shape}, expected [{dim}, vocab] to match hidden {hidden.shape}")
  scaled_stats = lambda logits, t, vocab: stats_fn(logits / temperature, t, vocab)
  targets = targets.astype(jnp.int32)
  entered = parallel.entered() is not None
  if entered:
    row_axes = parallel.split_axes(targets.shape, ("batch", "seq"), "targets")[0]
    embed_axes, vocab_axes = parallel.split_axes(lm_head.shape, ("embed", "vocab"), "lm_head")
  if not entered or not set(embed_axes) <= set(row_axes):
    return _with_loss_sum(*_local_token_chunks(scaled_stats, hidden, lm_head, targets, chunk_size, logits_dtype,
                                               WHOLE_VOCAB, unroll, loss=loss))
  weights = None if loss is None else loss.weights
  per_token = None if loss is None else loss.per_token
  # A vocab split over an axis that also splits the rows would mix different rows' logits: gather it.
  vocab_gather = tuple(a for a in vocab_axes if a in row_axes)
  mesh = parallel.current()[0]
  # The gathers wait for the hidden states: free to start earlier, the TPU scheduler carries a gathered
  # head through the decoder's layer loop and, short of HBM, re-gathers it in every layer.
  hidden, lm_head = jax.lax.optimization_barrier((hidden, lm_head))
  if not vocab_gather and _rows_gathered(mesh, hidden.shape, lm_head.shape, row_axes, embed_axes, vocab_axes):
    group = math.prod(mesh.shape[a] for a in embed_axes)
    vocab = VocabShard(vocab_axes + embed_axes, row_axes=embed_axes)
    row_gather = ((embed_axes, 0),)

    def local_rows(hidden, head, targets, weights):  # this device's rows [b, T, D], head [D / embed, V / vocab]
      head = jax.lax.all_to_all(head, embed_axes, split_axis=1, concat_axis=0, tiled=True)  # [D, V / vocab / embed]
      start = jax.lax.axis_index(embed_axes) * hidden.shape[0]
      group_loss = None
      if weights is not None:  # this device's rows weighted, the group's other rows 0: each row's loss counted once
        group_weights = jnp.zeros((hidden.shape[0] * group, weights.shape[1]), weights.dtype)
        group_loss = TokenLoss(jax.lax.dynamic_update_slice_in_dim(
            parallel.varying_like(group_weights, weights), weights, start, 0), per_token)
      stats, loss_sum = _local_token_chunks(scaled_stats, _gathered_for_autodiff(hidden, row_gather), head,
                                            _gathered(targets, row_gather), chunk_size * group, logits_dtype,
                                            vocab, unroll, loss=group_loss)  # the group's rows [b x group, T]
      return ({name: jax.lax.dynamic_slice_in_dim(value, start, hidden.shape[0]) for name, value in stats.items()},
              _partial_sum(loss_sum))

    return _with_loss_sum(*jax.shard_map(
        local_rows, mesh=mesh,
        in_specs=(P(row_axes, None, None), P(embed_axes, vocab_axes or None), P(row_axes, None), P(row_axes, None)),
        out_specs=(P(row_axes, None), P(row_axes)))(hidden, lm_head, targets, weights))
  gathers = tuple((axes, dim) for axes, dim in ((embed_axes, 0), (vocab_gather, 1)) if axes)
  vocab = VocabShard(tuple(a for a in vocab_axes if a not in row_axes))

  def local(hidden, head, targets, weights):  # this device's rows [b, T, D], head [D / embed, V / vocab]
    stats, loss_sum = _local_token_chunks(scaled_stats, hidden, head, targets, chunk_size, logits_dtype, vocab,
                                          unroll, gathers, None if weights is None else TokenLoss(weights, per_token))
    return stats, _partial_sum(loss_sum)

  rows = row_axes or None
  return _with_loss_sum(*jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(rows, None, None), P(embed_axes or None, vocab_axes or None), P(rows, None), P(rows, None)),
      out_specs=(P(rows, None), P(rows)))(hidden, lm_head, targets, weights))


def _partial_sum(loss_sum: Array | None) -> Array | None:
  """A device's loss sum as its row shard's entry [1] of the shard_map's result (None stays None)."""
  return None if loss_sum is None else loss_sum[None]


def _with_loss_sum(stats: dict[str, Array], loss_sum: Array | None) -> dict[str, Array]:
  """stats, plus "loss_sum" (the row shards' partial sums added up) where there is a loss."""
  return stats if loss_sum is None else stats | {"loss_sum": jnp.sum(loss_sum)}


def _rows_gathered(mesh, hidden_shape: tuple[int, ...], head_shape: tuple[int, ...], row_axes: tuple[str, ...],
                   embed_axes: tuple[str, ...], vocab_axes: tuple[str, ...]) -> bool:
  """Whether `_map_token_chunks` gathers the hidden rows of each head "embed" group (2 x the group's
  tokens x hidden bytes a step) rather than the head (2 x hidden x the vocab slice): when the group
  holds fewer tokens than the vocab slice has entries and splits that slice evenly."""
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  group, vocab_here = size(embed_axes), head_shape[1] // size(vocab_axes)
  group_tokens = hidden_shape[0] // size(row_axes) * group * hidden_shape[1]
  return group > 1 and vocab_here % group == 0 and group_tokens < vocab_here


Gathers = tuple[tuple[tuple[str, ...], int], ...]  # (mesh axes, array dim) to all-gather, in order


def _gathered(x: Array, gathers: Gathers) -> Array:
  for axes, dim in gathers:
    x = jax.lax.all_gather(x, axes, axis=dim, tiled=True)
  return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gathered_for_autodiff(x: Array, gathers: Gathers) -> Array:
  """`_gathered`, whose gradient goes back by `_scattered` (JAX's own transpose of an all-gather is a
  psum_scatter)."""
  return _gathered(x, gathers)


def _gathered_for_autodiff_fwd(x, gathers):
  return _gathered(x, gathers), x


def _gathered_for_autodiff_bwd(gathers, x, d_gathered):
  return (parallel.sum_to_match(_scattered(d_gathered, gathers, x.dtype), x),)


_gathered_for_autodiff.defvjp(_gathered_for_autodiff_fwd, _gathered_for_autodiff_bwd)


def _scattered(d: Array, gathers: Gathers, dtype) -> Array:
  """The transpose of `_gathered`: each device's float32 gradient summed over the gathered axes, this
  device's slice kept, in `dtype`. One all-to-all per gather sends each device the slice it keeps
  from every other, summed here in float32: a reduce-scatter that the TPU compiler cannot rewrite
  as an all-reduce of the whole array and a slice (it does, on some topologies, to psum_scatter)."""
  for axes, dim in reversed(gathers):
    shards = jax.lax.psum(1, axes)
    pieces = d.reshape(*d.shape[:dim], shards, d.shape[dim] // shards, *d.shape[dim + 1:])
    received = jax.lax.all_to_all(pieces.astype(dtype), axes, split_axis=dim, concat_axis=dim)
    d = received.astype(jnp.float32).sum(axis=dim)
  return d.astype(dtype)


def _local_token_chunks(stats_fn, hidden: Array, head: Array, targets: Array, chunk_size: int,
                        logits_dtype, vocab: VocabShard, unroll: bool = False, gathers: Gathers = (),
                        loss: TokenLoss | None = None) -> tuple[dict[str, Array], Array | None]:
  """`_map_token_chunks` on one device's rows: hidden [b, T, D], head [D, V_local] (inside shard_map:
  this device's shard, all-gathered over `gathers` here, once), targets [b, T] -> (stats, loss_sum:
  this device's terms of the loss, None without one).

  The chunks run as a `lax.scan` under a custom VJP, so that the logits exist for one chunk at a time
  in the forward and the backward pass, and the head gradient is summed in float32 over the chunks and
  reduce-scattered back to the shard in the head's dtype (`_scattered`: never an all-reduce of the whole
  head):
  - without a loss, the backward pass recomputes each chunk's logits and takes stats_fn's VJP for the
    logits' cotangent: 4 head products a chunk (a single chunk keeps its logits for plain autodiff: 3).
  - with one, the forward pass takes the loss's gradients of the hidden states and the head chunk by
    chunk (3 head products a chunk) and the backward pass scales them by the loss's cotangent; the
    stats are constants under differentiation. An operand that is not differentiated gets no product.
  """
  batch, seq, _ = hidden.shape
  seq_chunk = max(1, min(seq, chunk_size // batch))
  num_chunks = math.ceil(seq / seq_chunk)
  pad = num_chunks * seq_chunk - seq

  def to_chunks(x: Array) -> Array:  # [b, T, ...] -> [num_chunks, b, seq_chunk, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(batch, num_chunks, seq_chunk, *x.shape[2:]), 1, 0)

  def from_chunks(x: Array) -> Array:  # [num_chunks, b, seq_chunk] -> [b, T]
    return jnp.moveaxis(x, 0, 1).reshape(batch, num_chunks * seq_chunk)[:, :seq]

  ops = _ChunkOps(stats_fn, vocab, gathers, logits_dtype, unroll)

  def forward(h_chunks, w, t_chunks):
    chunk_stats = lambda carry, xs: (carry, stats_fn(ops.logits(xs[0], w), xs[1], vocab))
    return jax.lax.scan(chunk_stats, None, (h_chunks, t_chunks), unroll=unroll)[1]

  h_chunks, t_chunks = to_chunks(hidden), to_chunks(targets)
  if loss is not None:
    loss_sum, stats = _chunk_loss_with_gradients(ops, loss.per_token, h_chunks, head, t_chunks,
                                                 to_chunks(loss.weights.astype(jnp.float32)))
    return {name: from_chunks(jax.lax.stop_gradient(value)) for name, value in stats.items()}, loss_sum

  @jax.custom_vjp
  def chunked(h_chunks, w_shard, t_chunks):
    return forward(h_chunks, _gathered(w_shard, gathers), t_chunks)

  def chunked_fwd(h_chunks, w_shard, t_chunks):  # symbolic_zeros: the args come as CustomVJPPrimal
    h_chunks, w_shard, t_chunks = h_chunks.value, w_shard.value, t_chunks.value
    w = _gathered(w_shard, gathers)
    return forward(h_chunks, w, t_chunks), (h_chunks, w, t_chunks, w_shard)

  def chunked_bwd(residuals, d_stats):
    h_chunks, w, t_chunks, w_shard = residuals
    # Only the statistics the loss depends on are differentiated (e.g. not a metric's entropy).
    d_stats = {k: d for k, d in d_stats.items() if not isinstance(d, jax.custom_derivatives.SymbolicZero)}

    def body(d_head, xs):
      h, t, d = xs
      live_stats = lambda logits: {k: v for k, v in stats_fn(logits, t, vocab).items() if k in d}
      _, stats_vjp = jax.vjp(live_stats, ops.logits(h, w))
      d_logits = stats_vjp(d)[0].astype(h.dtype)
      return d_head + ops.head_gradient(h, d_logits), ops.hidden_gradient(d_logits, w)

    # Under shard_map the sum varies over every mesh axis its terms vary over.
    d_head = parallel.varying_like(jnp.zeros(w.shape, jnp.float32), h_chunks, w, *d_stats.values())
    d_head, d_hidden = jax.lax.scan(body, d_head, (h_chunks, t_chunks, d_stats), unroll=unroll)
    # Reduce-scattered to this device's shard; rows on devices that share it (e.g. over "data") add up.
    d_shard = _scattered(d_head, gathers, w.dtype)
    return d_hidden, parallel.sum_to_match(d_shard, w_shard), None

  chunked.defvjp(chunked_fwd, chunked_bwd, symbolic_zeros=True)
  if num_chunks > 1:
    stats = chunked(h_chunks, head, t_chunks)
  else:
    stats = forward(h_chunks, _gathered_for_autodiff(head, gathers), t_chunks)
  return {name: from_chunks(value) for name, value in stats.items()}, None


@dataclasses.dataclass(frozen=True)
class _ChunkOps:
  """One device's chunk arithmetic (`_local_token_chunks`): its logits, stats and LM-head products."""

  stats_fn: StatsFn
  vocab: VocabShard
  gathers: Gathers
  logits_dtype: Any
  unroll: bool

  def logits(self, h: Array, w: Array) -> Array:  # [b, s, D] x [D, V_local] -> [b, s, V_local] float32
    return jnp.einsum("bsd,dv->bsv", h, w, preferred_element_type=self.logits_dtype).astype(jnp.float32)

  def head_gradient(self, h: Array, d_logits: Array) -> Array:  # -> [D, V_local] float32
    return jnp.einsum("bsd,bsv->dv", h, d_logits, preferred_element_type=jnp.float32)

  def hidden_gradient(self, d_logits: Array, w: Array) -> Array:  # -> [b, s, D], summed over vocab slices
    return self.vocab.hidden_sum(jnp.einsum("bsv,dv->bsd", d_logits, w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunk_loss_with_gradients(ops: _ChunkOps, per_token, h_chunks, w_shard, t_chunks, c_chunks):
  """(sum(c x per_token(stats)) over the chunks, the chunks' stats): h_chunks [n, b, s, D], w_shard
  [D / gathers, V_local], t_chunks and c_chunks (weights) [n, b, s]. Its VJP's forward pass takes the
  gradients of hidden, head and weights chunk by chunk (`_local_token_chunks`)."""
  w = _gathered(w_shard, ops.gathers)

  def body(carry, xs):
    h, t, c = xs
    chunk_sum, (stats, _) = _chunk_loss(ops, per_token, ops.logits(h, w), t, c)
    return carry, (chunk_sum, stats)

  chunk_sums, stats = jax.lax.scan(body, None, (h_chunks, t_chunks, c_chunks), unroll=ops.unroll)[1]
  return jnp.sum(chunk_sums), stats


def _chunk_loss(ops: _ChunkOps, per_token, logits: Array, targets: Array, weights: Array):
  """One chunk's (sum(weights x per-token loss), (stats, per-token loss)): logits [b, s, V_local] float32,
  targets and weights [b, s]."""
  stats = ops.stats_fn(logits, targets, ops.vocab)
  token_loss = per_token(stats)
  return jnp.sum(weights * token_loss), (stats, token_loss)


def _chunk_loss_with_gradients_fwd(ops: _ChunkOps, per_token, h_chunks, w_shard, t_chunks, c_chunks):
  with_head, with_weights = w_shard.perturbed, c_chunks.perturbed
  h_chunks, w_shard, t_chunks, c_chunks = h_chunks.value, w_shard.value, t_chunks.value, c_chunks.value
  w = _gathered(w_shard, ops.gathers)

  def body(d_head, xs):
    h, t, c = xs
    chunk_loss = lambda logits: _chunk_loss(ops, per_token, logits, t, c)
    (chunk_sum, (stats, token_loss)), d_logits = jax.value_and_grad(chunk_loss, has_aux=True)(ops.logits(h, w))
    d_logits = d_logits.astype(h.dtype)
    if with_head:
      d_head = d_head + ops.head_gradient(h, d_logits)
    return d_head, (chunk_sum, stats, ops.hidden_gradient(d_logits, w), token_loss)

  # Under shard_map the sum varies over every mesh axis its terms vary over.
  d_head = parallel.varying_like(jnp.zeros(w.shape, jnp.float32), h_chunks, w, c_chunks) if with_head else None
  d_head, (chunk_sums, stats, d_hidden, token_loss) = jax.lax.scan(
      body, d_head, (h_chunks, t_chunks, c_chunks), unroll=ops.unroll)
  d_shard = _scattered(d_head, ops.gathers, w.dtype) if with_head else None  # reduce-scattered to this device's shard
  return (jnp.sum(chunk_sums), stats), (d_hidden, d_shard, w_shard, token_loss if with_weights else None)


def _chunk_loss_with_gradients_bwd(ops: _ChunkOps, per_token, residuals, cotangents):
  del ops, per_token
  d_hidden, d_shard, w_shard, token_loss = residuals
  d_loss = cotangents[0]  # the stats' cotangents are zero: they leave `_local_token_chunks` as constants
  scale = lambda x: None if x is None else (d_loss * x.astype(jnp.float32)).astype(x.dtype)
  # Rows on devices that share the head's shard (e.g. over "data") add up.
  d_shard = None if d_shard is None else parallel.sum_to_match(scale(d_shard), w_shard)
  return scale(d_hidden), d_shard, None, scale(token_loss)


_chunk_loss_with_gradients.defvjp(_chunk_loss_with_gradients_fwd, _chunk_loss_with_gradients_bwd,
                                  symbolic_zeros=True)


def chunked_cross_entropy(
    hidden: Array,
    lm_head: Array,
    targets: Array,
    loss_mask: Array,
    chunk_size: int,
    z_loss_weight: float = 0.0,
    logits_dtype=jnp.float32,
    unroll: bool = False,
) -> dict[str, Array]:
  """Masked next-token cross-entropy, computed chunk by chunk from final hidden states.

  hidden: [B, T, D], lm_head: [D, V], targets: [B, T] int, loss_mask: [B, T] (0/1 or weights).
  Returns float32 sums to be divided ONCE by the global token count:
    loss_sum: sum(mask * (nll + z_loss_weight * logsumexp^2))  (the objective's numerator)
    z_loss_sum: the z-loss part of loss_sum; token_count: sum(mask);
    correct_sum: masked count of argmax == target (the target logit the largest, ties included);
    entropy_sum: masked sum of predictive entropy.
  Only loss_sum is differentiable (hidden, lm_head and loss_mask; its gradients are taken in the
  forward pass, `_local_token_chunks`); the other sums are metrics, constants under differentiation.
  """
  mask = loss_mask.astype(jnp.float32)
  token_loss = lambda stats: z_loss_weight * jnp.square(stats["log_z"]) - stats["log_prob"]
  stats = _map_token_chunks(_token_stats, hidden, lm_head, targets, chunk_size, logits_dtype,
                            unroll=unroll, loss=TokenLoss(mask, token_loss))
  z_loss_sum = z_loss_weight * jnp.sum(mask * jnp.square(stats["log_z"]))
  return {
      "loss_sum": stats["loss_sum"],
      "token_count": jnp.sum(mask),
      "z_loss_sum": z_loss_sum,
      "correct_sum": jnp.sum(mask * stats["correct"]),
      "entropy_sum": jnp.sum(mask * stats["entropy"]),
  }


def _log_prob_and_entropy(logits: Array, targets: Array, vocab: VocabShard) -> dict[str, Array]:
  stats = _softmax_stats(logits, targets, vocab)
  return {"log_prob": stats["log_prob"], "entropy": stats["entropy"]}


def chunked_token_log_probs(
    hidden: Array,
    lm_head: Array,
    targets: Array,
    chunk_size: int,
    temperature: float = 1.0,
    logits_dtype=jnp.float32,
    unroll: bool = False,
) -> tuple[Array, Array]:
  """Float32 log p(target) and entropy of softmax(hidden @ lm_head / temperature), chunked.

  hidden: [B, T, D], lm_head: [D, V], targets: [B, T] -> (log_probs [B, T], entropies [B, T]).
  """
  stats = _map_token_chunks(_log_prob_and_entropy, hidden, lm_head, targets, chunk_size,
                            logits_dtype, temperature, unroll)
  return stats["log_prob"], stats["entropy"]


# ----------------------------------------------------------------------------------------------
# GRPO.


def group_advantages(
    rewards: Array,
    group_size: int | None = None,
    group_ids: Array | None = None,
    scale: str = "group_std",
    eps: float = 1e-6,
) -> Array:
  """Group-relative advantages A_i = (r_i - mean_group(r)) / (std + eps).

  rewards: [N]. Groups are given by group_size (consecutive blocks of that size) or group_ids [N]
  (ints in [0, N)). scale: "group_std" (unbiased std of the group), "batch_std" (unbiased std of
  all N rewards) or "none" (Dr. GRPO: centring only). A group of one, or of equal rewards, gets 0.
  """
  if scale not in ADVANTAGE_SCALES:
    raise ValueError(f"advantage scale {scale!r} is not one of {ADVANTAGE_SCALES}")
  rewards = jnp.asarray(rewards, jnp.float32)
  num = rewards.shape[0]
  if (group_size is None) == (group_ids is None):
    raise ValueError("group_advantages needs exactly one of group_size or group_ids")
  if group_size is not None:
    if group_size < 1 or num % group_size:
      raise ValueError(f"{num} rewards do not split into groups of group_size={group_size}")
    group_ids = jnp.arange(num) // group_size
  group_ids = jnp.asarray(group_ids, jnp.int32)
  if not isinstance(group_ids, jax.core.Tracer) and num and (
      int(group_ids.min()) < 0 or int(group_ids.max()) >= num):
    raise ValueError(f"group_ids must lie in [0, {num}); got range "
                     f"[{int(group_ids.min())}, {int(group_ids.max())}]")

  def group_sum(values):
    return jax.ops.segment_sum(values, group_ids, num_segments=num)[group_ids]

  count = group_sum(jnp.ones_like(rewards))
  # Exact test for equal rewards: float32 rounding of the mean must not turn them into +-1.
  varies = (jax.ops.segment_max(rewards, group_ids, num_segments=num)[group_ids]
            > jax.ops.segment_min(rewards, group_ids, num_segments=num)[group_ids])
  centred = rewards - group_sum(rewards) / count
  if scale == "group_std":
    group_var = group_sum(jnp.square(centred)) / jnp.maximum(count - 1.0, 1.0)
    centred = centred / (jnp.sqrt(group_var) + eps)
  elif scale == "batch_std":
    centred = centred / ((jnp.std(rewards, ddof=1) if num > 1 else 0.0) + eps)
  return jnp.where(varies, centred, 0.0)


POLICY_LOSSES = ("grpo", "gspo", "gspo_token", "cispo")


def _clip_bounds(eps_low: float | None, eps_high: float | None) -> tuple[float | None, float | None]:
  return (None if eps_low is None else 1.0 - eps_low), (None if eps_high is None else 1.0 + eps_high)


def _per_token(values: Array, shape: tuple[int, ...]) -> Array:
  """[B] or [B, T] float32 values as [B, T] (a per-sequence value on each of its tokens)."""
  values = jnp.asarray(values, jnp.float32)
  return jnp.broadcast_to(values if values.ndim == 2 else values[:, None], shape)


def policy_loss_terms(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    eps_low: float | None = 0.2,
    eps_high: float | None = 0.2,
    dual_clip: float | None = None,
    log_ratio_clamp: float | None = 20.0,
    refined_mask: Array | None = None,
    shaping_gamma: float = 0.1,
    loss_type: str = "grpo",
) -> dict[str, Array]:
  """Per-token policy-gradient losses l_t of `loss_type` (A = the token's advantage):

  grpo: l_t = -min(r_t A, clip(r_t, 1-eps_low, 1+eps_high) A), r_t = exp(logp - old_logp) (also Dr.
    GRPO's, which differs in its advantages and normaliser only).
  gspo: the sequence ratio s = exp(mean over the sequence's masked tokens of logp - old_logp) in
    l_t = -min(s A, clip(s, ...) A) on each token (arXiv 2507.18071).
  gspo_token: the same with s_t = sg(s) exp(logp_t - sg(logp_t)): equal value, per-token gradient
    paths (equal to gspo's when A is constant along the sequence).
  cispo: l_t = -sg(clip(r_t, 1-eps_low, 1+eps_high)) A logp_t (MiniMax-M1, arXiv 2506.13585): the
    clip bounds the IS weight, no token leaves the gradient.

  logp, old_logp, mask: [B, T]; advantages: [B] (one per sequence) or [B, T] (per token).
  eps_low/eps_high None: no clip on that side. dual_clip c (> 1, A < 0 only, grpo):
  l_t = min(l_t, -c A). log_ratio_clamp bounds logp - old_logp (per token, and GSPO's mean).
  refined_mask [B, T] or [B] (Critique-GRPO / LUFFY policy shaping of off-policy tokens): those tokens
  use l_t = -f(p) A with p = exp(logp), f(p) = p / (p + shaping_gamma), no ratio and no clipping.
  Returns [B, T] float32 arrays (zero where mask is 0): token_loss, ratio (r_t, or s for gspo; 1 on
  refined tokens), log_ratio and the 0/1 indicators clipped_low, clipped_high (tokens whose ratio the clip bounds),
  dual_clipped.
  """
  if loss_type not in POLICY_LOSSES:
    raise ValueError(f"policy loss {loss_type!r} is not one of {POLICY_LOSSES}")
  if dual_clip is not None and loss_type != "grpo":
    raise ValueError(f"dual_clip applies to the grpo surrogate, not {loss_type!r}")
  mask = mask.astype(jnp.float32)
  adv = _per_token(advantages, mask.shape)
  # Zero the log-ratio off the mask so padding with -inf/garbage log-probs cannot leak NaNs.
  live_logp = jnp.where(mask > 0, logp.astype(jnp.float32), 0.0)
  log_ratio = jnp.where(mask > 0, live_logp - old_logp.astype(jnp.float32), 0.0)
  if log_ratio_clamp is not None:
    log_ratio = jnp.clip(log_ratio, -log_ratio_clamp, log_ratio_clamp)
  if loss_type in ("gspo", "gspo_token"):
    seq_log_ratio = jnp.sum(log_ratio, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    if log_ratio_clamp is not None:
      seq_log_ratio = jnp.clip(seq_log_ratio, -log_ratio_clamp, log_ratio_clamp)
    seq_log_ratio = jnp.broadcast_to(seq_log_ratio[:, None], mask.shape)
    if loss_type == "gspo_token":
      seq_log_ratio = jax.lax.stop_gradient(seq_log_ratio) + live_logp - jax.lax.stop_gradient(live_logp)
    log_ratio = seq_log_ratio
  ratio = jnp.exp(log_ratio)
  low, high = _clip_bounds(eps_low, eps_high)
  clipped_ratio = jnp.clip(ratio, low, high)
  if loss_type == "cispo":
    token_loss = -jax.lax.stop_gradient(clipped_ratio) * adv * live_logp
    clipped_low = ratio < low if low is not None else jnp.zeros_like(mask, bool)
    clipped_high = ratio > high if high is not None else jnp.zeros_like(mask, bool)
  else:
    token_loss = jnp.maximum(-ratio * adv, -clipped_ratio * adv)
    clipped_low = (adv < 0) & (ratio < low) if low is not None else jnp.zeros_like(mask, bool)
    clipped_high = (adv > 0) & (ratio > high) if high is not None else jnp.zeros_like(mask, bool)
  dual_clipped = jnp.zeros_like(mask, bool)
  if dual_clip is not None:
    if dual_clip <= 1.0:
      raise ValueError(f"dual_clip must be > 1 (typically 3), got {dual_clip}")
    dual_clipped = (adv < 0) & (token_loss > -dual_clip * adv)
    token_loss = jnp.where(adv < 0, jnp.minimum(token_loss, -dual_clip * adv), token_loss)
  if refined_mask is not None:
    refined = _per_token(refined_mask, mask.shape) > 0
    prob = jnp.exp(live_logp)
    token_loss = jnp.where(refined, -prob / (prob + shaping_gamma) * adv, token_loss)
    log_ratio, ratio = jnp.where(refined, 0.0, log_ratio), jnp.where(refined, 1.0, ratio)
    clipped_low, clipped_high, dual_clipped = (
        flag & ~refined for flag in (clipped_low, clipped_high, dual_clipped))
  return {
      "token_loss": mask * token_loss,
      "ratio": mask * ratio,
      "log_ratio": mask * log_ratio,
      "clipped_low": mask * clipped_low,
      "clipped_high": mask * clipped_high,
      "dual_clipped": mask * dual_clipped,
  }


def kl_penalty(
    logp: Array, ref_logp: Array, kind: str = "k3", clamp: float | None = 20.0,
    k3_clamp: float | None = 10.0,
) -> Array:
  """Per-token KL(policy || reference) estimate; logp, ref_logp: [B, T] -> [B, T] float32.

  k1 = logp - ref_logp; k3 = exp(ref - logp) - (ref - logp) - 1. The log difference is clamped to
  +-clamp and k3 to +-k3_clamp (None disables either).
  """
  if kind not in KL_KINDS:
    raise ValueError(f"kl kind {kind!r} is not one of {KL_KINDS}")
  log_diff = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
  if clamp is not None:
    log_diff = jnp.clip(log_diff, -clamp, clamp)
  if kind == "k1":
    return -log_diff
  k3 = jnp.exp(log_diff) - log_diff - 1.0
  return k3 if k3_clamp is None else jnp.clip(k3, -k3_clamp, k3_clamp)


def aggregation_denominator(mask: Array, mode: str, max_response_len: int | None = None) -> Array:
  """Local share of the loss normaliser for `mode`; sum it over micro-batches / devices.

  mask: [B, T]. token_mean: masked token count; seq_mean_token_mean: number of sequences with at
  least one token; seq_mean_token_sum_norm: that number times max_response_len (default T).
  """
  if mode not in AGGREGATION_MODES:
    raise ValueError(f"loss aggregation mode {mode!r} is not one of {AGGREGATION_MODES}")
  mask = mask.astype(jnp.float32)
  if mode == "token_mean":
    return jnp.sum(mask)
  num_seqs = jnp.sum(jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
  if mode == "seq_mean_token_mean":
    return num_seqs
  return num_seqs * float(max_response_len or mask.shape[1])


def aggregate(
    token_losses: Array, mask: Array, mode: str = "token_mean", max_response_len: int | None = None,
) -> tuple[Array, Array]:
  """(numerator, local denominator) of the aggregated loss; token_losses, mask: [B, T].

  The loss is numerator / denominator with the denominator summed over the GLOBAL batch, so that
  splitting the batch into micro-batches or across devices leaves loss and gradient unchanged.
  seq_mean_token_mean's numerator is the sum over sequences of each sequence's masked token mean.
  """
  denominator = aggregation_denominator(mask, mode, max_response_len)
  mask = mask.astype(jnp.float32)
  masked_sum = token_losses * mask
  if mode == "seq_mean_token_mean":
    seq_tokens = jnp.sum(mask, axis=1)
    numerator = jnp.sum(jnp.sum(masked_sum, axis=1) / jnp.maximum(seq_tokens, 1.0))
  else:
    numerator = jnp.sum(masked_sum)
  return numerator, denominator


def truncated_is_weights(old_logp: Array, sampler_logp: Array, cap: float) -> Array:
  """Truncated importance weights min(exp(old_logp - sampler_logp), cap) [B, T] against the
  sampler/trainer mismatch (old_logp: the trainer's recomputed log-probs of the sampled tokens)."""
  if cap <= 0:
    raise ValueError(f"truncated importance sampling cap must be > 0, got {cap}")
  log_weight = old_logp.astype(jnp.float32) - sampler_logp.astype(jnp.float32)
  return jnp.exp(jnp.minimum(log_weight, math.log(cap)))


def grpo_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    ref_logp: Array | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    eps_low: float | None = 0.2,
    eps_high: float | None = 0.2,
    dual_clip: float | None = None,
    log_ratio_clamp: float | None = 20.0,
    aggregation: str = "token_mean",
    max_response_len: int | None = None,
    refined_mask: Array | None = None,
    shaping_gamma: float = 0.1,
    loss_type: str = "grpo",
    token_weights: Array | None = None,
    entropy: Array | None = None,
    entropy_coef: float = 0.0,
) -> dict[str, Array]:
  """The policy objective's pieces for one micro-batch (see policy_loss_terms, kl_penalty, aggregate).

  logp, old_logp, mask, ref_logp, token_weights, entropy: [B, T]; advantages: [B] or [B, T].
  Token loss = w_t l_t (policy_loss_terms of `loss_type`, w_t = token_weights, default 1, not
  differentiated) + kl_coef * kl_t - entropy_coef * entropy_t, aggregated with `aggregation` (mask
  counts the tokens; weights scale them). Returns float32 scalars: loss_sum and pg_loss_sum /
  kl_loss_sum / entropy_loss_sum (numerators to divide by the GLOBAL sum of `denominator`),
  denominator, token_count, and masked token sums for metrics: kl_sum, clip_low_sum, clip_high_sum,
  dual_clip_sum, ratio_sum, abs_log_ratio_sum, weight_sum, plus ratio_min / ratio_max over masked
  tokens (+inf / -inf when none).
  """
  if kl_coef and ref_logp is None:
    raise ValueError("grpo_loss: kl_coef > 0 needs ref_logp (reference-model log-probs)")
  if entropy_coef and entropy is None:
    raise ValueError("grpo_loss: entropy_coef != 0 needs the per-token entropy")
  mask = mask.astype(jnp.float32)
  terms = policy_loss_terms(logp, old_logp, advantages, mask, eps_low, eps_high, dual_clip,
                            log_ratio_clamp, refined_mask, shaping_gamma, loss_type)
  weights = (jnp.ones_like(mask) if token_weights is None
             else jax.lax.stop_gradient(token_weights.astype(jnp.float32)))
  if ref_logp is None:
    kl = jnp.zeros_like(mask)
  else:  # padding log-probs (possibly -inf) are zeroed before they can make NaNs
    live = mask > 0
    kl = mask * kl_penalty(jnp.where(live, logp, 0.0), jnp.where(live, ref_logp, 0.0), kl_kind)
  pg_loss_sum, denominator = aggregate(weights * terms["token_loss"], mask, aggregation,
                                       max_response_len)
  kl_loss_sum = aggregate(kl, mask, aggregation, max_response_len)[0]
  entropy_loss_sum = jnp.zeros((), jnp.float32)
  if entropy is not None:
    entropy_loss_sum = -aggregate(jnp.where(mask > 0, entropy, 0.0), mask, aggregation,
                                  max_response_len)[0]
  return {
      "loss_sum": pg_loss_sum + kl_coef * kl_loss_sum + entropy_coef * entropy_loss_sum,
      "pg_loss_sum": pg_loss_sum,
      "kl_loss_sum": kl_loss_sum,
      "entropy_loss_sum": entropy_loss_sum,
      "denominator": denominator,
      "token_count": jnp.sum(mask),
      "kl_sum": jnp.sum(kl),
      "clip_low_sum": jnp.sum(terms["clipped_low"]),
      "clip_high_sum": jnp.sum(terms["clipped_high"]),
      "dual_clip_sum": jnp.sum(terms["dual_clipped"]),
      "ratio_sum": jnp.sum(terms["ratio"]),
      "abs_log_ratio_sum": jnp.sum(jnp.abs(terms["log_ratio"])),
      "weight_sum": jnp.sum(mask * weights),
      "ratio_min": jnp.min(jnp.where(mask > 0, terms["ratio"], jnp.inf)),
      "ratio_max": jnp.max(jnp.where(mask > 0, terms["ratio"], -jnp.inf)),
  }


# ----------------------------------------------------------------------------------------------
# The model's forward pass into loss sums.


def check_cft_batch(batch: dict[str, Array], micro_batches: int) -> None:
  """Raises unless `batch` has every CFT key and its rows split into micro-batches x batch shards."""
  missing = [key for key in CFT_BATCH_KEYS if key not in batch]
  if missing:
    raise ValueError(f"CFT batch is missing {missing}; it needs {list(CFT_BATCH_KEYS)}")
  parallel.check_batch_divisible(batch["inputs"].shape[0], micro_batches, "CFT batch")


def _compute_params(model_cfg: ModelConfig, params: Any, compute_dtype: Any) -> tuple[ModelConfig, Any]:
  """(model_cfg in the compute dtype with its attention backend resolved for the platform the program
  runs on (`parallel.platform`), params cast to the dtype); compute_dtype None = model_cfg.dtype."""
  dtype = jnp.dtype(compute_dtype or model_cfg.dtype)
  backend = attention.resolve(model_cfg.attention, parallel.platform())
  return model_cfg.replace(dtype=dtype.name, attention=backend), state_lib.cast_floats(params, dtype)


def _final_hidden(model_cfg: ModelConfig, params: Any, batch: dict[str, Array],
                  dropout_rng: Array | None) -> Array:
  rngs = None if dropout_rng is None else {"dropout": dropout_rng}
  return Decoder(model_cfg).apply({"params": params}, batch["inputs"], batch["positions"],
                                  batch["segment_ids"], return_hidden=True, rngs=rngs)


def ce_sums(model_cfg: ModelConfig, params: Any, batch: dict[str, Array], *, chunk_size: int,
            z_loss_weight: float = 0.0, compute_dtype: Any = None,
            dropout_rng: Array | None = None) -> dict[str, Array]:
  """`chunked_cross_entropy` sums of one CFT batch ([batch, seq] arrays, `CFT_BATCH_KEYS`).

  params (e.g. float32 master params) are cast to compute_dtype (default model_cfg.dtype) inside, so
  gradients with respect to them come back in their own dtype. dropout_rng: drives the LoRA adapters'
  dropout (model_cfg.lora_dropout; None: no dropout).
  """
  model_cfg, params = _compute_params(model_cfg, params, compute_dtype)
  return chunked_cross_entropy(_final_hidden(model_cfg, params, batch, dropout_rng),
                               lm_head_kernel(model_cfg, params), batch["targets"], batch["loss_mask"],
                               chunk_size, z_loss_weight, unroll=model_cfg.unroll_loops)


def completion_log_probs(model_cfg: ModelConfig, params: Any, batch: dict[str, Array], *, chunk_size: int,
                         temperature: float, compute_dtype: Any = None,
                         dropout_rng: Array | None = None) -> tuple[Array, Array]:
  """(log p(target) [B, T], entropy [B, T]) of softmax(logits / temperature), float32, chunked, of a
  batch with inputs, targets, positions and segment_ids; params and dropout_rng as in `ce_sums`."""
  model_cfg, params = _compute_params(model_cfg, params, compute_dtype)
  return chunked_token_log_probs(_final_hidden(model_cfg, params, batch, dropout_rng),
                                 lm_head_kernel(model_cfg, params), batch["targets"], chunk_size, temperature,
                                 unroll=model_cfg.unroll_loops)
