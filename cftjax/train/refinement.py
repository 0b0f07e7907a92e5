"""Critique-GRPO refinements (arXiv 2506.03106): each scored group's initial responses are critiqued,
the policy refines them from a second prompt (question + previous response + critique), and up to k
refinements, correct ones first, join the group as off-policy responses to the ORIGINAL prompt.

Critique sources (rl.refinement.critique):
  simple     "The answer is correct." / "The answer is incorrect." from the task reward;
  simple_gt  the same plus "The reference answer is X." (the record's reference answer);
  policy     the policy critiques the response with rl.refinement.critique_template;
  critic     a frozen cftjax run (rl.refinement.critic_run) does, on its own tokenizer.
A model-written critique is kept only when its verdict agrees with the reward's; a response whose
critique is dropped gets no refinement (counted in the metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import logging
import time
from typing import Any

import jax
import numpy as np

from cftjax import config as config_lib
from cftjax.data import critique as critique_lib
from cftjax.data.critique import CritiqueRecord
from cftjax.models import ModelConfig
from cftjax.models import checkpoint_io
from cftjax.train import rollout as rollout_lib

log = logging.getLogger(__name__)

WHEN = ("off", "always", "all_failed")
CRITIQUE_SOURCES = ("simple", "simple_gt", "policy", "critic")
MODEL_SOURCES = ("policy", "critic")


def enabled(rl: Any) -> bool:
  return rl.refinement.when != "off"


def rows_per_group(rl: Any) -> int:
  """Update-batch rows one prompt can fill: its G initial responses plus k refinements."""
  return rl.group_size + (rl.refinement.num_refinements if enabled(rl) else 0)


def check_settings(rl: Any) -> None:
  """Raises a ConfigError naming the rl.refinement key that cannot be used."""
  ref = rl.refinement
  if ref.when not in WHEN:
    raise config_lib.ConfigError(f"rl.refinement.when={ref.when!r} is not one of {WHEN}")
  if not enabled(rl):
    return
  if ref.critique not in CRITIQUE_SOURCES:
    raise config_lib.ConfigError(f"rl.refinement.critique={ref.critique!r} is not one of "
                                 f"{CRITIQUE_SOURCES}")
  if ref.critique == "critic" and not ref.critic_run:
    raise config_lib.ConfigError("rl.refinement.critique='critic' needs rl.refinement.critic_run (a "
                                 "cftjax run dir or model checkpoint)")
  if ref.num_refinements < 1:
    raise config_lib.ConfigError(f"rl.refinement.num_refinements={ref.num_refinements} must be >= 1")
  if ref.shaping_gamma <= 0:
    raise config_lib.ConfigError(f"rl.refinement.shaping_gamma={ref.shaping_gamma} must be > 0")
  if ref.critique_max_new_tokens < 1:
    raise config_lib.ConfigError("rl.refinement.critique_max_new_tokens must be >= 1")
  try:
    template = refinement_template(rl)
    template.messages(CritiqueRecord(question="q", solution="s", critique="c", reference_answer="a"),
                      with_target=False)
  except ValueError as e:
    raise config_lib.ConfigError(f"rl.refinement.template: {e}") from None
  if ref.critique in MODEL_SOURCES:
    critique_lib.get_template(ref.critique_template)
    if ref.verdict_style not in critique_lib.STYLES:
      raise config_lib.ConfigError(f"rl.refinement.verdict_style={ref.verdict_style!r} is not one of "
                                   f"{critique_lib.STYLES}")


def refinement_template(rl: Any) -> critique_lib.PromptTemplate:
  """The refinement prompt (placeholders question, solution = the previous response, critique,
  reference_answer); an empty system turn is left out."""
  spec = {k: v for k, v in rl.refinement.template.to_dict().items() if v}
  return critique_lib.get_template({"name": "refinement", **spec})


# A generator: (prompt rows [N] of int32 ids, max_new_tokens, rng) -> (tokens, logprobs, truncated).
Generate = Callable[[Sequence[np.ndarray], int, jax.Array], tuple[list, list, np.ndarray]]


def select_refinements(correct: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
  """Indices of at most k refinements: correct ones first, each tier in random order."""
  order = rng.permutation(len(correct))
  return sorted(order, key=lambda i: not correct[i])[:k]


@dataclasses.dataclass
class Counts:
  """One step's refinement counts (summed over its groups)."""

  groups: int = 0
  groups_refined: int = 0
  critiques: int = 0
  critiques_kept: int = 0
  refinements: int = 0
  refinements_correct: int = 0
  refinements_added: int = 0
  initial_reward_sum: float = 0.0
  initial_count: int = 0
  refined_reward_sum: float = 0.0
  added_reward_sum: float = 0.0

  def metrics(self) -> dict[str, float]:
    return {
        "refine/groups_refined_fraction": self.groups_refined / max(self.groups, 1),
        "refine/critiques_kept_fraction": self.critiques_kept / max(self.critiques, 1),
        "refine/success_rate": self.refinements_correct / max(self.refinements, 1),
        "refine/refinements": float(self.refinements),
        "refine/refinements_added": float(self.refinements_added),
        "refine/initial_reward_mean": self.initial_reward_sum / max(self.initial_count, 1),
        "refine/refined_reward_mean": self.refined_reward_sum / max(self.refinements, 1),
        "refine/added_reward_mean": self.added_reward_sum / max(self.refinements_added, 1)}


class Refiner:
  """Adds Critique-GRPO refinements to scored groups (`refine`), with the `rl` section's settings.

  policy_generate / critic_generate: `Generate` callables of the current policy and (critique =
  critic) the frozen critic; score(groups) fills texts, scores and rewards (as for initial responses).
  same_rows(n) -> the row count every process generates for (the max over processes; pads keep
  generation, a collective, in step). tokenizer: the policy's; critic_tokenizer: the critic's.
  """

  def __init__(self, rl: Any, tokenizer: Any, policy_generate: Generate,
               score: Callable[[list[rollout_lib.Group]], None], *, critic_generate: Generate | None = None,
               critic_tokenizer: Any = None, same_rows: Callable[[int], int] = int, seed: int = 0):
    check_settings(rl)
    self.rl, self.settings = rl, rl.refinement
    self.tokenizer = tokenizer
    self.policy_generate, self.score, self.same_rows = policy_generate, score, same_rows
    self.critic_generate = critic_generate if self.settings.critique == "critic" else policy_generate
    self.critic_tokenizer = critic_tokenizer if self.settings.critique == "critic" else tokenizer
    self.template = refinement_template(rl)
    self.rng = np.random.default_rng(seed)
    self.counts, self.time_s = Counts(), 0.0

  def _correct(self, scores: np.ndarray) -> np.ndarray:
    return np.asarray(scores) >= self.settings.correct_score

  def _generate(self, generate: Generate, rows: list[np.ndarray], max_new_tokens: int,
                rng: jax.Array) -> tuple[list, list, np.ndarray]:
    """`generate` on rows padded (by repeating a row) to the row count of every process, rounded up
    to a power of two unless rl.generation_batch_size fixes the call shape (few compiled shapes)."""
    total = self.same_rows(len(rows))
    if not total:
      return [], [], np.zeros(0, bool)
    if not self.rl.generation_batch_size:
      total = 1 << (total - 1).bit_length()
    filler = rows[-1] if rows else np.zeros(1, np.int32)
    tokens, logprobs, truncated = generate(rows + [filler] * (total - len(rows)), max_new_tokens, rng)
    return tokens[:len(rows)], logprobs[:len(rows)], truncated[:len(rows)]

  def _critiques(self, items: list[tuple[rollout_lib.Group, int]], rng: jax.Array) -> list[str | None]:
    """One critique per (group, response) item; None where a model's verdict disagrees."""
    settings = self.settings
    if settings.critique not in MODEL_SOURCES:
      return [critique_lib.rule_critique(
          bool(self._correct(g.scores[i])),
          g.prompt["record"].reference_answer if settings.critique == "simple_gt" else None)
              for g, i in items]
    rows = [critique_lib.render_prompt(
        CritiqueRecord(question=g.prompt["record"].question, solution=g.texts[i]),
        settings.critique_template, self.critic_tokenizer) for g, i in items]
    tokens, _, _ = self._generate(self.critic_generate, rows, settings.critique_max_new_tokens, rng)
    kept = []
    for (group, i), ids in zip(items, tokens):
      text = self.critic_tokenizer.decode(ids, skip_special_tokens=True)
      verdict = critique_lib.parse_verdict(text, style=settings.verdict_style)
      self.counts.critiques += 1
      agrees = verdict is not None and verdict == bool(self._correct(group.scores[i]))
      self.counts.critiques_kept += agrees
      kept.append(text if agrees else None)
    return kept

  def take_metrics(self) -> dict[str, float]:
    """The refine/* metrics of the `refine` calls since the last take (one step's), then resets."""
    metrics = self.counts.metrics() | {"refine/time_s": self.time_s}
    self.counts, self.time_s = Counts(), 0.0
    return metrics

  def refine(self, groups: Sequence[rollout_lib.Group], rng: jax.Array) -> None:
    """Appends up to rl.refinement.num_refinements refinements to each eligible scored group (in
    place; their `refined` flags set), counting them for `take_metrics`."""
    started = time.perf_counter()
    counts = self.counts
    counts.groups += len(groups)
    eligible = [g for g in groups if self.settings.when == "always"
                or not self._correct(g.scores[~g.refined]).any()]
    items = [(g, i) for g in eligible for i in np.flatnonzero(~g.refined)]
    critiques = self._critiques(items, jax.random.fold_in(rng, 0))
    kept = [(item, text) for item, text in zip(items, critiques) if text is not None]
    prompts = [critique_lib.render_prompt(CritiqueRecord(
        question=g.prompt["record"].question, solution=g.texts[i], critique=text,
        reference_answer=g.prompt["record"].reference_answer), self.template, self.tokenizer)
               for (g, i), text in kept]
    long = [len(p) > self.rl.max_prompt_len for p in prompts]
    if any(long):
      log.warning("%d refinement prompts longer than rl.max_prompt_len=%d were dropped", sum(long),
                  self.rl.max_prompt_len)
    kept = [item for item, is_long in zip(kept, long) if not is_long]
    prompts = [p for p, is_long in zip(prompts, long) if not is_long]
    tokens, logprobs, truncated = self._generate(self.policy_generate, prompts, self.rl.max_new_tokens,
                                                 jax.random.fold_in(rng, 1))
    rows_of: dict[int, list[int]] = {}
    for row, ((group, _), _) in enumerate(kept):
      rows_of.setdefault(id(group), []).append(row)
    parents = [g for g in eligible if id(g) in rows_of]
    refinements = [rollout_lib.Group(g.prompt, [tokens[r] for r in rows_of[id(g)]],
                                     [logprobs[r] for r in rows_of[id(g)]], truncated[rows_of[id(g)]])
                   for g in parents]
    if refinements:
      self.score(refinements)
    for g in eligible:
      counts.initial_reward_sum += float(g.rewards[~g.refined].sum())
      counts.initial_count += int((~g.refined).sum())
    for group, refined in zip(parents, refinements):
      correct = self._correct(refined.scores)
      chosen = select_refinements(correct, self.settings.num_refinements, self.rng)
      group.append(refined, chosen, refined=True)
      counts.groups_refined += 1
      counts.refinements += len(correct)
      counts.refinements_correct += int(correct.sum())
      counts.refined_reward_sum += float(refined.rewards.sum())
      counts.refinements_added += len(chosen)
      counts.added_reward_sum += float(refined.rewards[chosen].sum())
    self.time_s += time.perf_counter() - started


def policy_generator(get_params: Callable[[], Any], model_cfg: ModelConfig, rl: Any,
                     tokenizer: Any) -> Generate:
  """A `Generate` sampling from the current policy params (get_params() at each call)."""
  def generate(rows, max_new_tokens, rng):
    return rollout_lib.sample_rows(get_params(), model_cfg, rows, rl, tokenizer, rng, max_new_tokens)

  return generate


def critic_generator(rl: Any) -> tuple[Generate, Any]:
  """(a `Generate` of the frozen critic in rl.refinement.critic_run, the critic's tokenizer)."""
  model_cfg, params, tokenizer = checkpoint_io.load_model(rl.refinement.critic_run)
  log.info("Critique-GRPO critic: %s", rl.refinement.critic_run)

  def generate(rows, max_new_tokens, rng):
    return rollout_lib.sample_rows(params, model_cfg, rows, rl, tokenizer, rng, max_new_tokens)

  return generate, tokenizer
