"""GRPO rewards: a registry, built-ins (verdict, step, math, code, critic), routing by task, scaling by source.
A reward that raises scores 0 with the error as its reason (counted, logged); training goes on."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import re
from typing import Any, Callable, Mapping, Sequence

from cftjax.data.critique import (CritiqueRecord, parse_first_wrong_step, parse_verdict,
                                  remove_think)
from cftjax.rewards.critic import critic_for
from cftjax.rewards.grading import MathGrader, shared_grader
from cftjax.rewards.code_tests import run_tests
from cftjax.rewards.sandbox import Limits, check_isolation

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RewardResult:
  """score: the reward; reason: why (e.g. "no verdict"); error: the reward fn raised."""

  score: float
  reason: str
  error: bool = False


# fn(completion_text, record, **options) -> RewardResult
RewardFn = Callable[..., RewardResult]
# fn(completions, records, **options) -> list[RewardResult], one per completion
BatchRewardFn = Callable[..., list[RewardResult]]


@dataclasses.dataclass(frozen=True)
class _Registered:
  fn: Callable[..., Any]
  batched: bool


_REGISTRY: dict[str, _Registered] = {}


def register_reward(name: str, batched: bool = False) -> Callable[[Callable], Callable]:
  """Decorator registering a reward under `name`.

  The function takes (completion_text, record, **options) and returns a RewardResult; with
  batched=True it takes (completions, records, **options) and returns one RewardResult each.
  """
  def register(fn: Callable) -> Callable:
    if name in _REGISTRY:
      raise ValueError(f"register_reward: a reward named {name!r} is already registered")
    _REGISTRY[name] = _Registered(fn, batched)
    return fn
  return register


def _registered(name: str) -> _Registered:
  if name not in _REGISTRY:
    raise KeyError(f"unknown reward {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def _error_result(name: str, record: CritiqueRecord, error: Exception) -> RewardResult:
  logger.warning("reward %r failed on record %r (source %r): %s: %s", name, record.id,
                 record.source, type(error).__name__, error)
  return RewardResult(0.0, f"error: {type(error).__name__}: {error}", error=True)


def _checked(name: str, result: Any) -> RewardResult:
  if not isinstance(result, RewardResult) or not math.isfinite(result.score):
    raise TypeError(f"reward {name!r} must return a RewardResult with a finite score, "
                    f"got {result!r}")
  return result


def get_reward(name: str) -> RewardFn:
  """The reward `name` as fn(completion_text, record, **options) -> RewardResult, never raising."""
  registered = _registered(name)

  def reward(completion_text: str, record: CritiqueRecord, **options) -> RewardResult:
    try:
      if registered.batched:
        return _checked(name, registered.fn([completion_text], [record], **options)[0])
      return _checked(name, registered.fn(completion_text, record, **options))
    except Exception as e:  # pylint: disable=broad-except
      return _error_result(name, record, e)

  return reward


def score_batch(name: str, completions: Sequence[str], records: Sequence[CritiqueRecord],
                **options) -> list[RewardResult]:
  """Rewards for completions[i] on records[i]; batched rewards run in parallel (worker pools).

  If a batched reward raises, each item is retried alone so one bad record costs only its own score.
  """
  if len(completions) != len(records):
    raise ValueError(f"score_batch: {len(completions)} completions but {len(records)} records")
  registered = _registered(name)
  if registered.batched and completions:
    try:
      results = registered.fn(list(completions), list(records), **options)
      if len(results) != len(completions):
        raise ValueError(f"returned {len(results)} results for {len(completions)} completions")
      return [_checked(name, r) for r in results]
    except Exception as e:  # pylint: disable=broad-except
      logger.warning("batched reward %r failed (%s: %s); scoring its %d items one by one", name,
                     type(e).__name__, e, len(completions))
  reward = get_reward(name)
  return [reward(c, r, **options) for c, r in zip(completions, records)]


# ----------------------------------------------------------------------------------------------
# Built-in rewards.


@register_reward("verdict")
def verdict_reward(completion_text: str, record: CritiqueRecord, style: str = "auto",
                   strip_think: bool = True) -> RewardResult:
  """1 when the critique's verdict equals record.label (CRL), else 0; no verdict scores 0."""
  if record.label is None:
    raise ValueError(f"record {record.id!r} (source {record.source!r}) has no label; the verdict "
                     "reward needs the solution's correctness label")
  verdict = parse_verdict(completion_text, style=style, strip_think=strip_think)
  if verdict is None:
    return RewardResult(0.0, "no verdict")
  if verdict == record.label:
    return RewardResult(1.0, "verdict matches label")
  return RewardResult(0.0, "verdict contradicts label")


@register_reward("step")
def step_reward(completion_text: str, record: CritiqueRecord, indexing: str = "processbench",
                partial_credit: float = 0.0, strip_think: bool = True) -> RewardResult:
  """1 when the boxed first wrong step equals record.error_step (exact index; -1 = no wrong step),
  the DeepCritic / ProcessBench judgement reward; no boxed index scores 0.

  indexing: how the completion counts steps ("processbench" 0-based, "deepcritic" 1-based).
  partial_credit (default 0 = the published reward): the score, in [0, 1), of a completion that
  names a wrong step at the wrong index for a solution that has one: it found the solution wrong
  but not where. This shaped variant is cftjax's own, not from either paper.
  """
  if record.error_step is None:
    raise ValueError(f"record {record.id!r} (source {record.source!r}) has no error_step; the step "
                     "reward needs the first wrong step's label (-1 when every step is right)")
  if not 0.0 <= partial_credit < 1.0:
    raise ValueError(f"step reward: partial_credit={partial_credit} must be in [0, 1)")
  step = parse_first_wrong_step(completion_text, indexing=indexing, strip_think=strip_think)
  if step is None:
    return RewardResult(0.0, "no step index")
  if step == record.error_step:
    return RewardResult(1.0, "step matches label")
  if step != -1 and record.error_step != -1:
    return RewardResult(partial_credit, f"wrong step {step} (label {record.error_step})")
  return RewardResult(0.0, f"step {step} contradicts label {record.error_step}")


@register_reward("math", batched=True)
def math_reward(completions: Sequence[str], records: Sequence[CritiqueRecord],
                grader: MathGrader | None = None) -> list[RewardResult]:
  """1 when the last \\boxed{} answer outside <think> blocks verifies against
  record.reference_answer (math-verify, in the grader's worker processes)."""
  golds = []
  for record in records:
    if record.reference_answer is None:
      raise ValueError(f"record {record.id!r} (source {record.source!r}) has no reference_answer; "
                       "the math reward needs one")
    golds.append(record.reference_answer)
  grader = grader or shared_grader()
  return [RewardResult(float(correct), reason)
          for correct, reason in grader.grade_many(golds, completions)]


_CODE_BLOCK = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("python", "python3", "py", "")


def extract_code(text: str) -> str | None:
  """The last fenced code block tagged python (or untagged) after removing <think> blocks."""
  blocks = [body for tag, body in _CODE_BLOCK.findall(remove_think(text))
            if tag.lower() in _PYTHON_TAGS]
  return blocks[-1] if blocks else None


@register_reward("code", batched=True)
def code_reward(completions: Sequence[str], records: Sequence[CritiqueRecord],
                isolation: str = "bwrap", wall_s: float = 5.0, cpu_s: float = 5.0,
                memory_mb: int = 512, disk_mb: int = 64, budget_s: float = 30.0,
                all_or_nothing: bool = False, num_workers: int = 4,
                parallel_tests: int = 2) -> list[RewardResult]:
  """Pass rate of the completion's last python code block on record.tests, run in the code
  sandbox (cftjax.rewards.code_tests; the options are rl.code's keys, config.py). all_or_nothing
  scores 1 only when every test passes and stops at the first failure. num_workers completions
  are scored at once, each running up to parallel_tests stdin/stdout tests at once."""
  for record in records:
    if record.tests is None:
      raise ValueError(f"record {record.id!r} (source {record.source!r}) has no tests; the code "
                       "reward needs them")
  limits = Limits(wall_s=wall_s, cpu_s=cpu_s, memory_mb=memory_mb, disk_mb=disk_mb)

  def score(completion: str, record: CritiqueRecord) -> RewardResult:
    code = extract_code(completion)
    if code is None:
      return RewardResult(0.0, "no code block")
    pass_rate, reasons = run_tests(code, record.tests, limits=limits, isolation=isolation,
                                   budget_s=budget_s, stop_at_first_failure=all_or_nothing,
                                   parallel=parallel_tests)
    failures = [r for r in reasons if r != "passed"]
    reason = f"{len(reasons) - len(failures)}/{len(reasons)} tests passed"
    score = float(not failures) if all_or_nothing else pass_rate
    return RewardResult(score, reason + (f"; first failure: {failures[0]}" if failures else ""))

  with concurrent.futures.ThreadPoolExecutor(num_workers, "cftjax-code-reward") as pool:
    return list(pool.map(score, completions, records))


@register_reward("critic", batched=True)
def critic_reward(completions: Sequence[str], records: Sequence[CritiqueRecord], **options) -> list[RewardResult]:
  """A frozen critic's judgement of each completion as a solution to record.question (<think> blocks
  removed): its verdict (1 right, 0 wrong or none) or p(right) from its logits.

  options (`cftjax.rewards.critic.critic_for`): ckpt (a cftjax checkpoint or run directory, run in
  process) or endpoint (an OpenAI-compatible base URL such as `cftjax serve`'s http://HOST:PORT/v1);
  template (the critique prompt, default "cft"), verdict_style, score ("verdict" | "probability",
  in process only), max_new_tokens, and batch_size (in process) or model / concurrency / api_key /
  timeout_s (endpoint).
  """
  critic = critic_for(**options)
  judgements = critic.judge([r.question for r in records], [remove_think(c) for c in completions])
  return [RewardResult(j.score, j.reason) for j in judgements]


# ----------------------------------------------------------------------------------------------
# Routing by task and scaling by source.

_CONFIG_KEYS = ("by_task", "scale_by_source", "options", "math_grader")


class RewardComputer:
  """Routes each completion to the reward of its task and scales it by its record's source.

  config (dict or ml_collections.ConfigDict):
    by_task: {task: reward name}, e.g. {"crl": "verdict", "math": "math", "code": "code"}.
    scale_by_source: {record.source: factor}, e.g. {"crl": 0.8}; unlisted sources keep 1.
    options: {reward name: keyword options}, e.g. {"verdict": {"style": "crl"}}.
    math_grader: MathGrader arguments, e.g. {"num_workers": 4, "timeout_s": 5.0}.
  code: the code reward's options (the rl.code section: isolation, limits, workers); then
    options.code must be unset. When a task routes to "code", the isolation is checked here: an
    unavailable one raises IsolationUnavailable naming rl.code.isolation.
  `error_count` counts rewards that raised (scored 0). Close it (or use `with`) to stop workers.
  """

  def __init__(self, config: Mapping[str, Any] | Any, code: Mapping[str, Any] | Any = None):
    config = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown:
      raise ValueError(f"RewardComputer: unknown config keys {unknown}; allowed: {_CONFIG_KEYS}")
    if not config.get("by_task"):
      raise ValueError("RewardComputer: config.by_task must map each task to a reward, e.g. "
                       "{'crl': 'verdict', 'math': 'math', 'code': 'code'}")
    self.by_task: dict[str, str] = dict(config["by_task"])
    for task, name in self.by_task.items():
      if name not in _REGISTRY:
        raise ValueError(f"RewardComputer: config.by_task.{task} = {name!r} is not a registered "
                         f"reward; registered: {sorted(_REGISTRY)}")
    self.scale_by_source: dict[str, float] = {
        source: float(scale) for source, scale in dict(config.get("scale_by_source") or {}).items()}
    self.options: dict[str, dict[str, Any]] = {
        name: dict(opts) for name, opts in dict(config.get("options") or {}).items()}
    if code is not None:
      if "code" in self.options:
        raise ValueError("RewardComputer: the code reward's options come from rl.code; remove "
                         "rl.rewards.options.code")
      self.options["code"] = dict(code.to_dict() if hasattr(code, "to_dict") else code)
    if "code" in self.by_task.values():
      check_isolation(self.options.get("code", {}).get("isolation", "bwrap"))
    self._grader_args = dict(config.get("math_grader") or {})
    self._grader: MathGrader | None = None
    self.error_count = 0

  def _options_for(self, name: str) -> dict[str, Any]:
    options = dict(self.options.get(name, {}))
    if name == "math":
      if self._grader is None:
        self._grader = MathGrader(**self._grader_args)
      options.setdefault("grader", self._grader)
    return options

  def __call__(self, completions: Sequence[str], records: Sequence[CritiqueRecord],
               tasks: Sequence[str]) -> list[RewardResult]:
    """One scaled RewardResult per completion; tasks[i] picks the reward for completions[i]."""
    if not len(completions) == len(records) == len(tasks):
      raise ValueError(f"RewardComputer: {len(completions)} completions, {len(records)} records, "
                       f"{len(tasks)} tasks; they must match")
    indices_by_reward: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
      if task not in self.by_task:
        raise ValueError(f"RewardComputer: no reward for task {task!r} (record {records[i].id!r}); "
                         f"add it to config.by_task (has {sorted(self.by_task)})")
      indices_by_reward.setdefault(self.by_task[task], []).append(i)
    results: list[RewardResult | None] = [None] * len(completions)
    for name, indices in indices_by_reward.items():
      scored = score_batch(name, [completions[i] for i in indices], [records[i] for i in indices],
                           **self._options_for(name))
      for i, result in zip(indices, scored):
        scale = self.scale_by_source.get(records[i].source, 1.0)
        results[i] = dataclasses.replace(result, score=result.score * scale)
    errors = sum(r.error for r in results)
    if errors:
      self.error_count += errors
      logger.warning("%d of %d rewards failed and scored 0 (%d so far)", errors, len(results),
                     self.error_count)
    return results

  def close(self) -> None:
    if self._grader is not None:
      self._grader.close()
      self._grader = None

  def __enter__(self) -> "RewardComputer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
