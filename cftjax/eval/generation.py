"""Batched generation for the eval runners: a loaded model, its stop ids, and completions of many
prompts in fixed-size batches (so each prompt bucket compiles once)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from cftjax import sampling
from cftjax.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class Model:
  """A loaded model: plain params, its config and its tokenizer."""

  params: Any
  cfg: ModelConfig
  tokenizer: Any


@dataclasses.dataclass(frozen=True)
class Completion:
  text: str
  num_tokens: int  # generated tokens, stop token included
  truncated: bool  # hit max_new_tokens without a stop token


def stop_ids(tokenizer: Any, stop_tokens: Sequence[str]) -> list[int]:
  """The tokenizer's eos ids plus those of `stop_tokens` that are in its vocabulary."""
  ids = list(tokenizer.eos_ids)
  for token in stop_tokens:
    try:
      ids.append(tokenizer.token_to_id(token))
    except KeyError:
      continue
  return list(dict.fromkeys(ids))


def generate_completions(params: Any, model_cfg: ModelConfig, tokenizer: Any, prompts: Sequence[np.ndarray],
                         bench: Any, suite: Any, seed_offset: int = 0
                         ) -> Iterator[tuple[list[int], list[Completion], float]]:
  """Generates for prompts in fixed-size batches, shortest prompts first.

  bench: sampling settings (max_new_tokens, temperature, top_k, top_p: a `suites.Benchmark`).
  suite: the eval suite config (batch_size, prompt_buckets, cache_dtype, seed, stop_tokens).
  Yields (positions into `prompts`, their completions, seconds the batch took). Every call has
  `suite.batch_size` rows (the last batch repeats its last prompt), so each prompt bucket
  compiles once. A batch's rng is the suite seed folded with seed_offset + the batch's first position.
  """
  order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
  eos = stop_ids(tokenizer, suite.stop_tokens)
  for start in range(0, len(order), suite.batch_size):
    positions = order[start:start + suite.batch_size]
    batch = [prompts[i] for i in positions]
    batch += [batch[-1]] * (suite.batch_size - len(batch))
    began = time.perf_counter()
    result = sampling.generate(
        params, model_cfg, batch,
        rng=jax.random.fold_in(jax.random.PRNGKey(suite.seed), seed_offset + positions[0]),
        max_new_tokens=bench.max_new_tokens, temperature=bench.temperature, top_k=bench.top_k,
        top_p=bench.top_p, stop_ids=eos, pad_id=sampling.pad_id(tokenizer), cache_dtype=suite.cache_dtype,
        prompt_buckets=tuple(suite.prompt_buckets) or None)
    seconds = time.perf_counter() - began
    completions = [
        Completion(tokenizer.decode(result.tokens[row, :result.lengths[row]], skip_special_tokens=True),
                   int(result.lengths[row]), bool(result.truncated[row]))
        for row in range(len(positions))]
    yield positions, completions, seconds


def complete_all(model: Model, prompts: Sequence[np.ndarray], bench: Any, suite: Any, seed_offset: int = 0
                 ) -> tuple[list[Completion], float]:
  """(a completion of every prompt, in order; the seconds generation took)."""
  out: list[Completion | None] = [None] * len(prompts)
  seconds = 0.0
  for positions, completions, took in generate_completions(model.params, model.cfg, model.tokenizer, prompts,
                                                           bench, suite, seed_offset):
    for position, completion in zip(positions, completions):
      out[position] = completion
    seconds += took
  return out, seconds
