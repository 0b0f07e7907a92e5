"""Request batching over the JAX sampler: concurrent requests become one `sampling.generate` call.

One worker thread owns the model. Requests wait in a queue; the worker takes the first, keeps
collecting for `batch_window_s` (or until `max_batch_rows` rows), groups what it holds by sampling
settings (one `generate` call needs one temperature / top-p / top-k / seed), and runs each group as a
batch. Batch rows are padded to a power of two and `max_new_tokens` rounded up to one, so a stream of
requests reuses a handful of compiled programs; every row is then cut back to its own request.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from cftjax import sampling
from cftjax.models.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """What one `generate` call shares across its rows. temperature 0 = greedy; seed None = the engine's
  own running seed (rows of one batch then share it)."""

  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
  prompt_ids: tuple[int, ...]
  max_new_tokens: int
  settings: SamplingSettings = SamplingSettings()
  stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Completion:
  """One request's result. `token_ids` are the generated ids up to and including a stop id (before any
  stop-string cut); `text` is their decoded text without special tokens, cut before the first stop
  string. finish_reason: "stop" (stop id or stop string) or "length" (max_new_tokens reached)."""

  text: str
  token_ids: list[int]
  finish_reason: str
  prompt_tokens: int


@dataclasses.dataclass
class EngineStats:
  requests: int = 0
  batches: int = 0
  largest_batch: int = 0


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def cut_at_stop_strings(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  """`text` up to (not including) the earliest occurrence of any stop string, and whether one occurred."""
  ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
  return (text[:min(ends)], True) if ends else (text, False)


def split_to_context(items: list, max_context: int | None) -> list[list]:
  """(request, future) pairs split into batches whose longest prompt plus largest `max_new_tokens`
  fits `max_context` (each request fits on its own: the API checks that); one batch when unlimited."""
  if max_context is None:
    return [items]
  batches: list[list] = []
  for item in sorted(items, key=lambda pair: len(pair[0].prompt_ids)):
    request = item[0]
    if batches:
      batch = batches[-1]
      longest = max(len(request.prompt_ids), *(len(r.prompt_ids) for r, _ in batch))
      largest = max(request.max_new_tokens, *(r.max_new_tokens for r, _ in batch))
      if longest + largest <= max_context:
        batch.append(item)
        continue
    batches.append([item])
  return batches


class Engine:
  """Serves `GenerationRequest`s from one model with batching. Thread-safe `submit`; `close` stops the
  worker after the queue drains. The max context is `cfg.max_position_embeddings` when set."""

  def __init__(self, params: dict[str, Any], cfg: ModelConfig, tokenizer: Any, *, max_batch_rows: int = 32,
               batch_window_s: float = 0.005):
    if max_batch_rows < 1:
      raise ValueError(f"max_batch_rows={max_batch_rows}; it must be >= 1")
    self.cfg = cfg
    self.tokenizer = tokenizer
    self.stats = EngineStats()
    self._params = params
    self._max_rows = max_batch_rows
    self._window = batch_window_s
    self._queue: queue.Queue[tuple[GenerationRequest, concurrent.futures.Future] | None] = queue.Queue()
    self._seeds = itertools.count()
    self._worker = threading.Thread(target=self._serve, name="cftjax-engine", daemon=True)
    self._worker.start()

  @property
  def max_context(self) -> int | None:
    return self.cfg.max_position_embeddings

  def submit(self, request: GenerationRequest) -> concurrent.futures.Future:
    """Queues `request`; the future resolves to a `Completion` (or the generation error)."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put((request, future))
    return future

  def generate(self, request: GenerationRequest) -> Completion:
    return self.submit(request).result()

  def close(self) -> None:
    self._queue.put(None)
    self._worker.join()

  def _serve(self) -> None:
    while True:
      first = self._queue.get()
      if first is None:
        return
      pending = [first]
      deadline = time.monotonic() + self._window
      closing = False
      while len(pending) < self._max_rows:
        try:
          item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
          break
        if item is None:
          closing = True
          break
        pending.append(item)
      groups: dict[SamplingSettings, list] = {}
      for request, future in pending:
        groups.setdefault(request.settings, []).append((request, future))
      for settings, group in groups.items():
        self._run_group(settings, group)
      if closing:
        return

  def _run_group(self, settings: SamplingSettings, group: list) -> None:
    live = [(r, f) for r, f in group if f.set_running_or_notify_cancel()]
    if not live:
      return
    for batch in split_to_context(live, self.max_context):
      requests = [r for r, _ in batch]
      try:
        completions = self._generate(settings, requests)
      except Exception as e:  # pylint: disable=broad-except  # the caller's future carries it
        logger.exception("generation failed for a batch of %d requests", len(requests))
        for _, future in batch:
          future.set_exception(e)
        continue
      self.stats.requests += len(requests)
      self.stats.batches += 1
      self.stats.largest_batch = max(self.stats.largest_batch, len(requests))
      for (_, future), completion in zip(batch, completions):
        future.set_result(completion)

  def _generate(self, settings: SamplingSettings, requests: list[GenerationRequest]) -> list[Completion]:
    rows = _next_power_of_two(len(requests))
    prompts = [list(r.prompt_ids) for r in requests]
    prompts += [prompts[0]] * (rows - len(prompts))  # padding rows, dropped below
    needed = max(r.max_new_tokens for r in requests)
    max_new = _next_power_of_two(needed)
    if self.max_context is not None:
      max_new = max(min(max_new, self.max_context - max(len(p) for p in prompts)), needed)
    seed = next(self._seeds) if settings.seed is None else settings.seed
    result = sampling.generate(self._params, self.cfg, prompts, rng=jax.random.key(seed),
                               max_new_tokens=max_new, temperature=settings.temperature,
                               top_k=settings.top_k, top_p=settings.top_p, stop_ids=self.tokenizer.eos_ids,
                               pad_id=sampling.pad_id(self.tokenizer))
    return [self._completion(request, result.tokens[i], int(result.lengths[i]))
            for i, request in enumerate(requests)]

  def _completion(self, request: GenerationRequest, tokens: np.ndarray, length: int) -> Completion:
    ids = [int(t) for t in tokens[:min(length, request.max_new_tokens)]]
    stopped = bool(ids) and ids[-1] in self.tokenizer.eos_ids and length <= request.max_new_tokens
    text, cut = cut_at_stop_strings(self.tokenizer.decode(ids, skip_special_tokens=True), request.stop)
    return Completion(text=text, token_ids=ids, finish_reason="stop" if stopped or cut else "length",
                      prompt_tokens=len(request.prompt_ids))
