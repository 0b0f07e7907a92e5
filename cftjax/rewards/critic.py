"""A frozen critic that judges policy outputs, for the `critic` reward (a generative reward model):
an in-process cftjax checkpoint run with the JAX sampler, or any OpenAI-compatible endpoint (e.g.
`cftjax serve`) through the official `openai` client. It critiques each (question, solution) greedily
and returns the parsed verdict, or, in process, the probability of a "right" verdict read from the
critic's logits at the verdict slot."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cftjax import sampling
from cftjax.data import critique
from cftjax.data.critique import CritiqueRecord
from cftjax.models import Decoder, lm_head_kernel
from cftjax.models import checkpoint_io

SCORES = ("verdict", "probability")
# Per verdict style: (the text that precedes the verdict word, the "right" word, the "wrong" word) as
# the critic writes them; the probability score reads the next-token logits of the two words there.
VERDICT_SLOTS = {"cft": ("Conclusion:", " right", " wrong"), "crl": ("\\conclusion{", "T", "F")}


@dataclasses.dataclass(frozen=True)
class Judgement:
  """score in [0, 1] (1 = right); verdict None when the critique has none; critique: the text."""

  score: float
  verdict: bool | None
  critique: str
  reason: str


def _judgement(text: str, style: str) -> Judgement:
  verdict = critique.parse_verdict(text, style)
  if verdict is None:
    return Judgement(0.0, None, text, "critic gave no verdict")
  return Judgement(float(verdict), verdict, text, f"critic verdict: {'right' if verdict else 'wrong'}")


class LocalCritic:
  """A cftjax checkpoint or run directory (best params) critiquing in batches of `batch_size` rows.

  score "verdict": 1 / 0 for a right / wrong verdict (0 with none); "probability": p(right) =
  softmax over the two verdict words' logits at the slot after VERDICT_SLOTS[style]'s marker in the
  greedy critique (0 when the critique never reaches a verdict slot); style must then be cft or crl.
  """

  def __init__(self, ckpt: str, template: Any = "cft", verdict_style: str = "auto", score: str = "verdict",
               max_new_tokens: int = 512, batch_size: int = 8):
    if score not in SCORES:
      raise ValueError(f"critic reward: score={score!r}; choose one of {SCORES}")
    if score == "probability" and verdict_style not in VERDICT_SLOTS:
      raise ValueError(f"critic reward: score='probability' needs verdict_style in {sorted(VERDICT_SLOTS)} "
                       f"(where the verdict word sits), got {verdict_style!r}")
    self.cfg, self.params, self.tokenizer = checkpoint_io.load_model(ckpt)
    self.template = critique.get_template(template)
    self.style, self.score, self.max_new_tokens, self.batch_size = verdict_style, score, max_new_tokens, batch_size
    self._lock = threading.Lock()
    cfg = self.cfg

    def last_logits(params, tokens, lengths):  # tokens [B, T] int32, lengths [B] -> [B, vocab]
      hidden = Decoder(cfg).apply({"params": params}, tokens, return_hidden=True)
      last = hidden[jnp.arange(tokens.shape[0]), lengths - 1]
      return last.astype(jnp.float32) @ lm_head_kernel(cfg, params).astype(jnp.float32)

    self._last_logits = jax.jit(last_logits)

  def judge(self, questions: Sequence[str], solutions: Sequence[str]) -> list[Judgement]:
    out: list[Judgement] = []
    with self._lock:  # one model, one caller at a time
      for start in range(0, len(questions), self.batch_size):
        out += self._judge_batch(questions[start:start + self.batch_size], solutions[start:start + self.batch_size])
    return out

  def _judge_batch(self, questions: Sequence[str], solutions: Sequence[str]) -> list[Judgement]:
    prompts = [critique.render_prompt(CritiqueRecord(question=q, solution=s), self.template, self.tokenizer)
               for q, s in zip(questions, solutions)]
    rows = len(prompts)
    padded = prompts + [prompts[-1]] * (self.batch_size - rows)
    result = sampling.generate(self.params, self.cfg, padded, rng=jax.random.PRNGKey(0),
                               max_new_tokens=self.max_new_tokens, temperature=0.0,
                               stop_ids=self.tokenizer.eos_ids, pad_id=sampling.pad_id(self.tokenizer))
    generated = [result.tokens[i, :result.lengths[i]].tolist() for i in range(rows)]
    texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    judgements = [_judgement(text, self.style) for text in texts]
    if self.score == "verdict":
      return judgements
    return self._probabilities(prompts, generated, judgements)

  def _probabilities(self, prompts: Sequence[np.ndarray], generated: Sequence[list[int]],
                     judgements: Sequence[Judgement]) -> list[Judgement]:
    marker, right, wrong = VERDICT_SLOTS[self.style]
    right_id, wrong_id = self.tokenizer.encode(right)[0], self.tokenizer.encode(wrong)[0]
    if right_id == wrong_id:
      raise ValueError(f"critic tokenizer: {right!r} and {wrong!r} start with the same token")
    prefixes: dict[int, list[int]] = {}
    for row, ids in enumerate(generated):
      for j in range(len(ids) - 1, -1, -1):  # the last verdict word written right after the marker
        if ids[j] in (right_id, wrong_id) and self.tokenizer.decode(ids[:j]).rstrip().endswith(marker):
          prefixes[row] = list(prompts[row]) + ids[:j]
          break
    out = [dataclasses.replace(j, score=0.0, reason="critic wrote no verdict slot") for j in judgements]
    if not prefixes:
      return out
    rows = sorted(prefixes)
    tokens, lengths = sampling.pad_prompts([prefixes[r] for r in rows], pad_id=sampling.pad_id(self.tokenizer))
    logits = np.asarray(self._last_logits(self.params, jnp.asarray(tokens), jnp.asarray(lengths)))
    p_right = np.exp(-np.logaddexp(0.0, logits[:, wrong_id] - logits[:, right_id]))  # sigmoid, stable
    for r, p in zip(rows, p_right):
      out[r] = dataclasses.replace(judgements[r], score=float(p), reason=f"p(right) = {float(p):.4f}")
    return out


class EndpointCritic:
  """An OpenAI-compatible server (`base_url` ending in /v1) asked with chat completions at
  temperature 0, `concurrency` requests at a time; scores are verdicts (1 / 0, 0 with none).
  model "" asks the server for its first listed model."""

  def __init__(self, base_url: str, model: str = "", template: Any = "cft", verdict_style: str = "auto",
               score: str = "verdict", max_new_tokens: int = 512, concurrency: int = 8, api_key: str = "EMPTY",
               timeout_s: float = 300.0):
    import openai  # pylint: disable=import-outside-toplevel  (only endpoint critics need the client)
    if score != "verdict":
      raise ValueError(f"critic reward: score={score!r} needs the critic's logits; an endpoint critic "
                       "scores verdicts only (set score='verdict', or ckpt= for an in-process critic)")
    self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=2)
    self.model = model or self.client.models.list().data[0].id
    self.template = critique.get_template(template)
    self.style, self.max_new_tokens, self.concurrency = verdict_style, max_new_tokens, concurrency

  def _critique(self, question: str, solution: str) -> str:
    messages = self.template.messages(CritiqueRecord(question=question, solution=solution), with_target=False)
    response = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0.0,
                                                   max_tokens=self.max_new_tokens)
    return response.choices[0].message.content or ""

  def judge(self, questions: Sequence[str], solutions: Sequence[str]) -> list[Judgement]:
    with concurrent.futures.ThreadPoolExecutor(self.concurrency, "cftjax-critic") as pool:
      texts = list(pool.map(self._critique, questions, solutions))
    return [_judgement(text, self.style) for text in texts]


_LOCAL_OPTIONS = ("template", "verdict_style", "score", "max_new_tokens", "batch_size")
_ENDPOINT_OPTIONS = ("model", "template", "verdict_style", "score", "max_new_tokens", "concurrency", "api_key",
                     "timeout_s")
_CRITICS: dict[str, LocalCritic | EndpointCritic] = {}
_CRITICS_LOCK = threading.Lock()


def critic_for(ckpt: str = "", endpoint: str = "", **options: Any) -> LocalCritic | EndpointCritic:
  """The critic for these options, built once per process (a checkpoint is loaded once)."""
  if bool(ckpt) == bool(endpoint):
    raise ValueError("critic reward: set exactly one of options.critic.ckpt (a cftjax checkpoint or run "
                     "directory) and options.critic.endpoint (an OpenAI-compatible base URL, e.g. "
                     f"http://127.0.0.1:8000/v1); got ckpt={ckpt!r}, endpoint={endpoint!r}")
  allowed = _LOCAL_OPTIONS if ckpt else _ENDPOINT_OPTIONS
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"critic reward: unknown option(s) {unknown} for {'a checkpoint' if ckpt else 'an endpoint'} "
                     f"critic; allowed: {sorted(allowed)}")
  key = json.dumps({"ckpt": ckpt, "endpoint": endpoint, **options}, sort_keys=True, default=str)
  with _CRITICS_LOCK:
    if key not in _CRITICS:
      _CRITICS[key] = LocalCritic(ckpt, **options) if ckpt else EndpointCritic(endpoint, **options)
    return _CRITICS[key]
