"""Autoregressive generation with a preallocated KV cache (right-padded, length-bucketed prompts)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
import numpy as np

from cftjax import parallel
from cftjax.config import ConfigError
from cftjax.models import attention
from cftjax.models.config import ModelConfig
from cftjax.models.decoder import (Decoder, decode_caches, decode_logits, decode_step, decode_weights,
                                   init_cache, token_log_probs)

logger = logging.getLogger(__name__)

Array = jax.Array
MIN_BUCKET = 16
CACHE_DTYPES = ("float32", "bfloat16")
DECODE_LOOP_SCOPE = "decode_loop"  # the named scope of the decode while loop


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  """Host (numpy) arrays; a row's entries after its `lengths` are `pad_id` / 0.0."""

  tokens: np.ndarray  # [batch, max_new_tokens] int32
  logprobs: np.ndarray  # [batch, max_new_tokens] float32, log softmax(logits / T) at each token
  lengths: np.ndarray  # [batch] int32, generated tokens including the stop token
  truncated: np.ndarray  # [batch] bool, reached max_new_tokens without a stop id or stop string


def pad_id(tokenizer: Any) -> int:
  """The id that pads a tokenizer's prompts and completions: its pad id (which falls back to its eos
  id), else 0."""
  return 0 if tokenizer.pad_id is None else tokenizer.pad_id


def bucket_length(length: int, buckets: Sequence[int] | None = None) -> int:
  """The padded prompt length for `length`: the smallest of `buckets` >= it, else a power of two >= 16."""
  if buckets is None:
    return max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length())
  fitting = [b for b in buckets if b >= length]
  if not fitting:
    raise ValueError(f"prompt length {length} exceeds the largest prompt bucket {max(buckets)}; "
                     "add a larger bucket or shorten the prompt")
  return min(fitting)


def pad_prompts(prompts: Sequence[Sequence[int]] | np.ndarray, prompt_lengths: Sequence[int] | None = None,
                *, buckets: Sequence[int] | None = None, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads prompts to one bucket length.

  prompts: a list of token-id lists, or an int array [batch, width] with `prompt_lengths` [batch].
  Returns (tokens [batch, bucket] int32, lengths [batch] int32).
  """
  if isinstance(prompts, (np.ndarray, jax.Array)):
    if prompt_lengths is None:
      raise ValueError("prompts given as an array need prompt_lengths (the real length of each row)")
    array = np.asarray(prompts)
    if array.ndim != 2 or len(prompt_lengths) != array.shape[0]:
      raise ValueError(f"prompts array has shape {array.shape} and prompt_lengths has "
                       f"{len(prompt_lengths)} entries; expected [batch, width] and batch lengths")
    lengths = np.asarray(prompt_lengths)
    bad_rows = np.nonzero((lengths < 1) | (lengths > array.shape[1]))[0]
    if bad_rows.size:
      raise ValueError(f"prompt_lengths of rows {bad_rows.tolist()} are outside [1, {array.shape[1]}] "
                       "(the prompts array width)")
    rows = [array[i, :n] for i, n in enumerate(lengths)]
  else:
    if prompt_lengths is not None:
      raise ValueError("prompt_lengths is only for prompts given as a padded array")
    rows = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
  if not rows:
    raise ValueError("prompts is empty; generate needs at least one prompt")
  for i, row in enumerate(rows):
    if len(row) == 0:
      raise ValueError(f"prompt row {i} is empty; every prompt needs at least one token")
  lengths = np.array([len(r) for r in rows], dtype=np.int32)
  tokens = np.full((len(rows), bucket_length(int(lengths.max()), buckets)), pad_id, dtype=np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  return tokens, lengths


def sample_tokens(rng: Array, logits: Array, temperature: Array, top_p: Array, *, greedy: bool,
                  top_k: int, use_top_p: bool) -> Array:
  """Draws one token per row from logits [batch, vocab] -> [batch] int32.

  Greedy takes the argmax. Otherwise logits are divided by `temperature`, cut to the `top_k` largest
  (0 = all), then to the smallest prefix (by descending probability, renormalised over that top-k)
  whose mass reaches `top_p`, and sampled. The filters only sort when they are on.
  """
  scaled = logits.astype(jnp.float32) / temperature
  if greedy:
    return jnp.argmax(scaled, axis=-1).astype(jnp.int32)
  if not (top_k or use_top_p):
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
  candidate_logits, candidate_ids = jax.lax.top_k(scaled, top_k or scaled.shape[-1])
  if use_top_p:
    probs = jax.nn.softmax(candidate_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    candidate_logits = jnp.where(mass_before < top_p, candidate_logits, -jnp.inf)
  choice = jax.random.categorical(rng, candidate_logits, axis=-1)
  return jnp.take_along_axis(candidate_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _cfg_key(cfg: ModelConfig) -> str:
  """A hashable stand-in for cfg (its rope_scaling dict makes the dataclass itself unhashable)."""
  return json.dumps(cfg.to_json_dict(), sort_keys=True)


@functools.lru_cache(maxsize=64)
def _compiled_generate(cfg_key: str, max_new_tokens: int, cache_dtype: str, greedy: bool, top_k: int,
                       use_top_p: bool, stop_ids: tuple[int, ...], pad_id: int,
                       mesh: jax.sharding.Mesh | None = None,
                       rules: parallel.LogicalRules = parallel.LOGICAL_RULES) -> Callable:
  """The jitted prefill + decode loop for one set of static settings (reused across calls); with a
  mesh (the params'), traced under it and its logical rules, so activations, the KV cache and the
  embedding lookup are placed by the rules (`parallel.activation_sharding`)."""
  cfg = ModelConfig(**json.loads(cfg_key))
  model = Decoder(cfg)
  decode = attention.backend(cfg.attention).decode
  stop_array = jnp.asarray(stop_ids, dtype=jnp.int32)
  sample = functools.partial(sample_tokens, greedy=greedy, top_k=top_k, use_top_p=use_top_p)

  def emit(state, logits, rng, temperature, top_p):
    """Samples column `step` from logits [batch, vocab]; rows already done get pad_id."""
    step, active = state["step"], ~state["done"]
    token = sample(jax.random.fold_in(rng, step), logits, temperature, top_p)
    token = jnp.where(active, token, pad_id)
    logprob = jnp.where(active, token_log_probs(logits, token, temperature), 0.0)
    stopped = jnp.isin(token, stop_array) if stop_ids else jnp.zeros_like(active)
    return dict(
        state,
        step=step + 1,
        tokens=jax.lax.dynamic_update_index_in_dim(state["tokens"], token, step, axis=1),
        logprobs=jax.lax.dynamic_update_index_in_dim(state["logprobs"], logprob, step, axis=1),
        lengths=state["lengths"] + active.astype(jnp.int32),
        done=state["done"] | (active & stopped),
    )

  def run(params, prompt_tokens, prompt_lengths, rng, temperature, top_p):
    """prompt_tokens: [batch, bucket] right-padded, prompt_lengths: [batch]."""
    batch, bucket = prompt_tokens.shape
    variables = {"params": params}
    cache = init_cache(cfg, batch, bucket + max_new_tokens, jnp.dtype(cache_dtype))
    slots = jnp.arange(bucket + max_new_tokens, dtype=jnp.int32)[None, :]
    hidden, cache = model.apply(variables, prompt_tokens, cache=cache, return_hidden=True)
    last_hidden = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    weights = decode_weights(cfg, decode, params)  # laid out once per call, not at every decode step
    state = {
        "step": jnp.int32(0),
        "tokens": jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        "logprobs": jnp.zeros((batch, max_new_tokens), jnp.float32),
        "lengths": jnp.zeros((batch,), jnp.int32),
        "done": jnp.zeros((batch,), bool),
        "cache": decode_caches(decode, cache),
    }
    state = emit(state, decode_logits(decode, weights, last_hidden), rng, temperature, top_p)

    def keep_going(state):
      return (state["step"] < max_new_tokens) & ~jnp.all(state["done"])

    def next_token(state):
      # Row b's previous token is at position prompt_lengths[b] + step - 1; every row's goes to cache
      # slot bucket + step - 1 (after the prompt bucket), and a row sees its prompt and its new tokens.
      step = state["step"]
      previous = jax.lax.dynamic_index_in_dim(state["tokens"], step - 1, axis=1, keepdims=False)
      slot = bucket + step - 1
      visible = (slots < prompt_lengths[:, None]) | ((slots >= bucket) & (slots <= slot))
      logits, cache = decode_step(cfg, decode, weights, previous, prompt_lengths + step - 1, slot, visible,
                                  state["cache"])
      return emit(dict(state, cache=cache), logits, rng, temperature, top_p)

    if max_new_tokens > 1:  # (a program without the loop is what `cftjax.aot` subtracts)
      with jax.named_scope(DECODE_LOOP_SCOPE):  # how `cftjax.aot` finds the loop in the optimised HLO
        state = jax.lax.while_loop(keep_going, next_token, state)
    return state["tokens"], state["logprobs"], state["lengths"], ~state["done"]

  def run_on_mesh(*args):
    with parallel.use_mesh(mesh, rules), parallel.activation_sharding():
      return run(*args)

  return jax.jit(run if mesh is None else run_on_mesh)


def generation_program(cfg: ModelConfig, *, max_new_tokens: int, temperature: float, top_k: int,
                       top_p: float, stop_ids: Sequence[int], cache_dtype: str, pad_id: int,
                       mesh: jax.sharding.Mesh | None = None,
                       rules: parallel.LogicalRules = parallel.LOGICAL_RULES) -> Callable:
  """The jitted prefill + decode loop `generate` runs for these settings (cfg.attention already
  resolved for the platform; on `mesh` by `rules` when given): `run(params, prompt_tokens [batch,
  bucket] int32, prompt_lengths [batch] int32, rng, temperature f32, top_p f32) -> (tokens,
  logprobs, lengths, truncated)`."""
  greedy = temperature == 0
  return _compiled_generate(_cfg_key(cfg), max_new_tokens, cache_dtype, greedy,
                            0 if greedy else min(top_k, cfg.vocab_size), not greedy and top_p < 1.0,
                            tuple(int(i) for i in stop_ids), pad_id, mesh, rules)


def _validate(cfg: ModelConfig, tokens: np.ndarray, pad_id: int, max_new_tokens: int, temperature: float,
              top_k: int, top_p: float, cache_dtype: str, stop_strings: Sequence[str],
              tokenizer: Any) -> None:
  if not 0 <= pad_id < cfg.vocab_size:
    raise ValueError(f"pad_id={pad_id} is outside [0, {cfg.vocab_size}) (vocab_size)")
  bad_rows = np.nonzero(((tokens < 0) | (tokens >= cfg.vocab_size)).any(axis=1))[0]
  if bad_rows.size:
    raise ValueError(f"prompt rows {bad_rows.tolist()} hold token ids outside [0, {cfg.vocab_size}) "
                     "(vocab_size)")
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens}; it must be >= 1")
  if temperature < 0:
    raise ConfigError(f"temperature={temperature}; use 0 for greedy or a positive value")
  if top_k < 0:
    raise ConfigError(f"top_k={top_k}; use 0 to turn top-k off or a positive count")
  if not 0.0 < top_p <= 1.0:
    raise ConfigError(f"top_p={top_p}; it must be in (0, 1] (1.0 turns nucleus filtering off)")
  if cache_dtype not in CACHE_DTYPES:
    raise ConfigError(f"cache_dtype={cache_dtype!r}; choose one of {CACHE_DTYPES}")
  if stop_strings and tokenizer is None:
    raise ValueError("stop_strings need a tokenizer (pass tokenizer=...) to decode the generated tokens")


def generate(params: dict[str, Any], cfg: ModelConfig, prompts: Sequence[Sequence[int]] | np.ndarray, *,
             rng: Array, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), tokenizer: Any = None,
             cache_dtype: str = "float32", pad_id: int = 0, prompt_lengths: Sequence[int] | None = None,
             prompt_buckets: Sequence[int] | None = None) -> GenerationResult:
  """Samples up to `max_new_tokens` tokens after each prompt.

  Layout: prompts are RIGHT-padded (`pad_prompts`) to a bucket length (`bucket_length`: the smallest of
  `prompt_buckets`, else a power of two >= 16), so calls with the same batch size, bucket and settings
  reuse one compiled program. The cache has bucket + max_new_tokens slots; slot = position, so row b's
  i-th new token is written at slot prompt_lengths[b] + i and the padding slots after its prompt are
  overwritten before any query can attend to them. One jitted function runs the prefill (all prompt
  tokens in one forward, layers scanned) and then a `lax.while_loop` of one-token decode steps that
  exits as soon as every row is done. Decode steps (`models.decoder.decode_step`) run the decoder's
  block with the layers unrolled, on per-layer weights cast and laid out once before the loop
  (`decode_weights`, in the decode layout of `cfg.attention`'s backend: on CPU [out, in] matrices)
  and on per-layer caches (see docs/architecture.md).

  Sampling: greedy when temperature == 0, else temperature, then top-k (0 = off), then top-p (1.0 = off).
  `logprobs` are log softmax(logits / temperature) of the sampled token under the *unfiltered*
  distribution (top-k / top-p change what is drawn, not the reported log-prob): this is what a trainer
  recomputes from a forward pass (`cftjax.train.losses.completion_log_probs`). With temperature 0 they use temperature 1.

  Stopping: a token in `stop_ids` ends its row (it is kept and counted in `lengths`). `stop_strings`
  are checked on the host after generation: each row is cut right after the first token at which its
  decoded text contains a stop string (binary search over prefixes; assumes a decoded prefix's text
  keeps the stop string as tokens are appended), so the loop itself runs on past them.

  params: plain (unboxed) params; rng: a PRNG key (fold_in(rng, step) draws step's tokens).
  prompts: a list of token-id lists, or an int array [batch, width] with `prompt_lengths` [batch].

  Several JAX processes (params sharded over a mesh that spans them): a collective call. Each
  process passes its own prompts (the same number of rows and the same settings and rng on every
  process) and gets back its own rows: the rows of all processes form one global batch, split over
  the mesh's batch axes, padded to one bucket they agree on, and generated by one SPMD program.
  """
  prompt_tokens, lengths = pad_prompts(prompts, prompt_lengths, buckets=prompt_buckets, pad_id=pad_id)
  _validate(cfg, prompt_tokens, pad_id, max_new_tokens, temperature, top_k, top_p, cache_dtype, stop_strings,
            tokenizer)
  cfg = cfg.replace(attention=attention.resolve(cfg.attention, _params_platform(params)))
  mesh, rules = _params_mesh(params)
  run = generation_program(cfg, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, stop_ids=stop_ids, cache_dtype=cache_dtype, pad_id=pad_id,
                           mesh=mesh, rules=rules)
  rows = len(lengths)
  if jax.process_count() > 1:
    prompt_tokens, lengths = _global_prompts(prompt_tokens, lengths, mesh, prompt_buckets, pad_id)
  outputs = run(params, prompt_tokens, lengths, rng, jnp.float32(temperature if temperature > 0 else 1.0),
                jnp.float32(top_p))
  if jax.process_count() > 1:
    with parallel.use_mesh(mesh):
      row_spec = parallel.batch_sharding(ndim=1).spec
    outputs = multihost_utils.global_array_to_host_local_array(outputs, mesh, row_spec)
  tokens, logprobs, out_lengths, truncated = (np.array(x)[:rows] for x in outputs)
  result = GenerationResult(tokens, logprobs, out_lengths, truncated)
  if stop_strings:
    _cut_at_stop_strings(result, tuple(stop_strings), tokenizer, pad_id)
  return result


def _params_platform(params: dict[str, Any]) -> str:
  """The platform of the devices the params live on (host arrays: JAX's default backend): where the
  sampler runs, so what model.attention="auto" resolves for."""
  sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
  return next(iter(sharding.device_set)).platform if sharding is not None else jax.default_backend()


def _params_mesh(params: dict[str, Any]) -> tuple[jax.sharding.Mesh | None, parallel.LogicalRules]:
  """(the mesh params are placed on, or None for host / single-device arrays; the logical rules: the
  current `use_mesh`'s when it is that mesh, else the defaults). Several processes need a mesh."""
  sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
  if not isinstance(sharding, NamedSharding):
    if jax.process_count() > 1:
      raise ValueError(f"{jax.process_count()} JAX processes: generate needs params placed on a device "
                       "mesh (NamedSharding, e.g. a TrainState's params), not host or single-device arrays")
    return None, parallel.LOGICAL_RULES
  entered = parallel.entered()
  return sharding.mesh, entered[1] if entered and entered[0] == sharding.mesh else parallel.LOGICAL_RULES


def _global_prompts(tokens: np.ndarray, lengths: np.ndarray, mesh: jax.sharding.Mesh,
                    buckets: Sequence[int] | None, pad_id: int) -> tuple[jax.Array, jax.Array]:
  """This process's padded prompts [rows, bucket] -> global arrays over the mesh's batch axes.

  All processes agree on the bucket (of the longest prompt anywhere); rows are padded with copies of
  the last one to a multiple of the local device count (they are cut off again after generation).
  """
  rows_and_longest = multihost_utils.process_allgather(np.array([len(lengths), lengths.max()], np.int32))
  if len(set(rows_and_longest[:, 0].tolist())) > 1:
    raise ValueError(f"generate across {jax.process_count()} processes got {rows_and_longest[:, 0].tolist()} "
                     "prompt rows per process; every process must pass the same number")
  width = bucket_length(int(rows_and_longest[:, 1].max()), buckets)
  extra = -len(lengths) % jax.local_device_count()
  tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])), constant_values=pad_id)
  tokens = np.concatenate([tokens, np.repeat(tokens[-1:], extra, axis=0)])
  lengths = np.concatenate([lengths, np.repeat(lengths[-1:], extra)])
  with parallel.use_mesh(mesh):
    batch = parallel.host_local_to_global({"tokens": tokens, "lengths": lengths})
  return batch["tokens"], batch["lengths"]


def _stop_string_end(ids: list[int], stop_strings: tuple[str, ...], tokenizer: Any) -> int | None:
  """The shortest prefix length of ids whose decoded text contains a stop string, or None."""

  def has_stop(n: int) -> bool:
    text = tokenizer.decode(ids[:n], skip_special_tokens=False)
    return any(s in text for s in stop_strings)

  if not has_stop(len(ids)):
    return None
  low, high = 1, len(ids)
  while low < high:
    middle = (low + high) // 2
    low, high = (low, middle) if has_stop(middle) else (middle + 1, high)
  return low


def _cut_at_stop_strings(result: GenerationResult, stop_strings: tuple[str, ...], tokenizer: Any,
                         pad_id: int) -> None:
  """Ends each row (in place) right after the token that completes its first stop string."""
  cut_rows = 0
  for row, length in enumerate(result.lengths.tolist()):
    end = _stop_string_end(result.tokens[row, :length].tolist(), stop_strings, tokenizer)
    if end is None:
      continue
    cut_rows += 1
    result.tokens[row, end:] = pad_id
    result.logprobs[row, end:] = 0.0
    result.lengths[row] = end
    result.truncated[row] = False
  logger.debug("stop strings ended %d of %d rows", cut_rows, len(result.lengths))
