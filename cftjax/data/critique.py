"""The critique format: `CritiqueRecord` (one question and candidate solution with whatever
supervision it carries), the prompt templates that render a record as chat messages, CFT ids with a
loss mask, or a prompt, and the parsers that read a critic's verdict back in each template's syntax
(CFT, CRL, Critique-RL) and the boxed first wrong step (ProcessBench, DeepCritic).

Templates are Python format strings over a record's fields (literal braces written doubled).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
from typing import Any, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class CritiqueRecord:
  """A question with a candidate solution and optional critique, label, answer and tests.

  Attributes:
    question: the problem statement.
    solution: the candidate solution to be critiqued ("" for plain RL prompts that have none).
    critique: the teacher critique (CFT target), ending in its verdict; None when absent.
    label: ground-truth correctness of `solution` (True = correct); None when unknown.
    reference_answer: the gold final answer (math), None when absent.
    tests: code tests, e.g. {"inputs": [...], "outputs": [...]} or a list of assert strings.
    error_step: ProcessBench earliest wrong step (0-based, -1 if none); None elsewhere.
    steps: ProcessBench solution steps; None elsewhere.
    source: the dataset / mixture component this row came from.
    id: a stable identifier (file:line when the row has none).
    system: the row's own system turn (one-shot CFT / verl messages); used when the template has none.
    instruction: the row's own task instruction (WebInstruct's `instruction`); templates place it
      with the {instruction} placeholder (the built-in `cft` template does, with its standard
      instruction for rows without one).
    task: the row's own RL task (`cft`, `crl`, `math`, `code`; verl rows set it), None when unknown.
    metadata: the row's other fields, kept as read (e.g. `level`, `unique_id`); None when none.
  """

  question: str
  solution: str = ""
  critique: str | None = None
  label: bool | None = None
  reference_answer: str | None = None
  tests: Any = None
  error_step: int | None = None
  steps: tuple[str, ...] | None = None
  source: str = ""
  id: str = ""
  system: str | None = None
  instruction: str | None = None
  task: str | None = None
  metadata: dict[str, Any] | None = None

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict in cftjax's own JSONL schema."""
    d = dataclasses.asdict(self)
    if d["steps"] is not None:
      d["steps"] = list(d["steps"])
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CritiqueRecord":
    d = dict(d)
    if d.get("steps") is not None:
      d["steps"] = tuple(d["steps"])
    return cls(**d)


# ------------------------------------------------------------------------------------------------
# Prompt templates.

# {steps} is the record's steps as tagged paragraphs numbered from 1 (`tagged_steps`).
PLACEHOLDERS = ("question", "solution", "critique", "reference_answer", "instruction", "steps")
SPEC_KEYS = ("system", "user", "assistant")

CFT_INSTRUCTION = "Please critique whether the following solution to the question is correct."
CFT_USER = "{instruction}\n\nQuestion:\n{question}\n\nSolution:\n{solution}\n\n"
CRL_USER = (
    "You will be given a question (problem specification) and a submitted solution. Your task is to "
    "determine whether the solution is correct and fully satisfies the specification.\n\n"
    "Question:\n{question}\n\nSolution:\n{solution}\n\n"
    "Conclude with \\conclusion{{T}} for correct, \\conclusion{{F}} for wrong."
)
STEP_CRITIQUE_USER = (
    "Below are a math problem and a candidate solution, split into paragraphs that are enclosed "
    "in tags and numbered from 1.\n\n[Math Problem]\n\n{question}\n\n[Solution]\n\n{steps}\n\n"
    "Check the paragraphs one at a time, in order: verify each one's reasoning and calculations "
    "before moving on. Find the first paragraph that contains an error; if every paragraph is "
    "correct, the answer is -1. End your response with \"**Answer**: \\boxed{{k}}\", where k is "
    "the number of that paragraph (or -1)."
)
REFINE_USER = (
    "{question}\n\nHere is a previous solution to this problem:\n{solution}\n\nA critique of that "
    "solution:\n{critique}\n\nTaking the critique into account, write a corrected solution step by step "
    "and put your final answer within \\boxed{{}}."
)
MATH_COT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{{}}."
CODE_USER = (
    "{question}\n\nWrite a complete Python 3 program that solves the problem above, reading from "
    "standard input and writing to standard output. Put the whole program in one ```python code block."
)


class MissingFieldError(ValueError):
  """A record lacks a field its template uses (e.g. a CFT target without a critique)."""


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """Format strings for the system, user and assistant turns (placeholders: PLACEHOLDERS).

  A template without a system turn keeps the row's own (`record.system`); one with a system turn
  replaces it. `{instruction}` is the row's instruction, else `default_instruction`.
  """

  name: str
  user: str
  system: str | None = None
  assistant: str | None = None
  default_instruction: str | None = None

  def __post_init__(self):
    for key in SPEC_KEYS:
      text = getattr(self, key)
      if text is None:
        continue
      if not isinstance(text, str):
        raise ValueError(f"template {self.name!r}: {key!r} must be a string or None, got "
                         f"{type(text).__name__}")
      unknown = sorted(set(_placeholders(text, self.name, key)) - set(PLACEHOLDERS))
      if unknown:
        raise ValueError(
            f"template {self.name!r}: unknown placeholder(s) {unknown} in {key!r}; allowed: "
            f"{list(PLACEHOLDERS)} (write literal braces doubled, e.g. \\boxed{{{{}}}})")

  def messages(self, record: CritiqueRecord, with_target: bool) -> list[dict[str, str]]:
    """Chat messages for `record`; the assistant turn is included only when `with_target`."""
    messages = []
    if self.system is not None:
      messages.append({"role": "system", "content": self._fill(self.system, record, "system")})
    elif record.system:
      messages.append({"role": "system", "content": record.system})
    messages.append({"role": "user", "content": self._fill(self.user, record, "user")})
    if with_target:
      if self.assistant is None:
        raise ValueError(f"template {self.name!r} has no assistant turn; it can only build prompts "
                         "(with_target=False)")
      messages.append({"role": "assistant", "content": self._fill(self.assistant, record, "assistant")})
    return messages

  def _fill(self, text: str, record: CritiqueRecord, role: str) -> str:
    values = {}
    for field in _placeholders(text, self.name, role):
      value = getattr(record, field)
      if value is not None and field == "steps":
        value = tagged_steps(value, first=1)
      if value is None and field == "instruction":
        value = self.default_instruction
      if value is None:
        raise MissingFieldError(f"record {record.id!r}: field {field!r} is None but template "
                         f"{self.name!r} uses {{{field}}} in its {role} turn")
      values[field] = value
    return text.format(**values)


def tagged_steps(steps: tuple[str, ...] | list[str], first: int = 0) -> str:
  """Steps as "<paragraph_i>\\n...\\n</paragraph_i>" blocks numbered from `first` (ProcessBench
  numbers from 0, DeepCritic from 1), separated by blank lines."""
  return "\n\n".join(f"<paragraph_{i}>\n{step}\n</paragraph_{i}>"
                      for i, step in enumerate(steps, start=first))


def template_fields(text: str) -> list[str]:
  """The record fields a template turn's format string uses."""
  return _placeholders(text, "template", "turn")


def _placeholders(text: str, name: str, key: str) -> list[str]:
  try:
    parsed = list(string.Formatter().parse(text))
  except ValueError as e:
    raise ValueError(f"template {name!r}: bad format string in {key!r}: {e} (write literal "
                     "braces doubled)") from None
  return [field for _, field, _, _ in parsed if field is not None]


BUILTIN_TEMPLATES = {
    "cft": PromptTemplate("cft", user=CFT_USER, assistant="Critique:\n{critique}",
                          default_instruction=CFT_INSTRUCTION),
    "crl": PromptTemplate("crl", user=CRL_USER, assistant="{critique}"),
    "math_cot": PromptTemplate("math_cot", system=MATH_COT_SYSTEM, user="{question}",
                               assistant="{solution}"),
    "code": PromptTemplate("code", user=CODE_USER, assistant="{solution}"),
    # Step-level critique (DeepCritic): find the first wrong of the record's steps, \boxed{k} from 1.
    "step_critique": PromptTemplate("step_critique", user=STEP_CRITIQUE_USER, assistant="{critique}"),
    # A row's own prompt and critique as written (DeepCritic `messages` rows).
    "verbatim": PromptTemplate("verbatim", user="{question}", assistant="{critique}"),
    "refine": PromptTemplate("refine", system=MATH_COT_SYSTEM, user=REFINE_USER),
}


def get_template(name_or_spec: str | Mapping[str, Any] | PromptTemplate) -> PromptTemplate:
  """A built-in template by name, or a custom one from {"system", "user", "assistant"}."""
  if isinstance(name_or_spec, PromptTemplate):
    return name_or_spec
  if isinstance(name_or_spec, str):
    if name_or_spec not in BUILTIN_TEMPLATES:
      raise ValueError(f"unknown template {name_or_spec!r}; built-in: {sorted(BUILTIN_TEMPLATES)}, "
                       "or pass a dict with keys system/user/assistant")
    return BUILTIN_TEMPLATES[name_or_spec]
  if hasattr(name_or_spec, "to_dict"):  # an ml_collections ConfigDict from a config file
    name_or_spec = name_or_spec.to_dict()
  if not isinstance(name_or_spec, Mapping):
    raise ValueError(f"template must be a name or a dict, got {type(name_or_spec).__name__}")
  spec = dict(name_or_spec)
  name = spec.pop("name", "custom")
  unknown_keys = sorted(set(spec) - set(SPEC_KEYS) - {"default_instruction"})
  if unknown_keys:
    raise ValueError(f"template {name!r}: unknown key(s) {unknown_keys}; allowed: "
                     f"{[*SPEC_KEYS, 'default_instruction']}")
  if not spec.get("user"):
    raise ValueError(f"template {name!r}: 'user' is required (e.g. '{{question}}')")
  return PromptTemplate(name, user=spec["user"], system=spec.get("system"),
                        assistant=spec.get("assistant"), default_instruction=spec.get("default_instruction"))


def render_cft(record: CritiqueRecord, template: PromptTemplate | str, tokenizer
               ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids [seq] and loss mask [seq] (1 on the assistant turn and its end-of-turn token)."""
  messages = get_template(template).messages(record, with_target=True)
  ids, mask = tokenizer.encode_chat_with_mask(messages)
  return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def render_prompt(record: CritiqueRecord, template: PromptTemplate | str, tokenizer) -> np.ndarray:
  """Prompt token ids [seq] ending with the generation prompt of the assistant turn."""
  messages = get_template(template).messages(record, with_target=False)
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  return np.asarray(ids, np.int32)


def rule_critique(correct: bool, reference_answer: str | None = None) -> str:
  """Critique-GRPO's rule-based critique: "simple" (correct / incorrect), or "simple_gt" with the
  reference answer appended when one is given."""
  text = "The answer is correct." if correct else "The answer is incorrect."
  if reference_answer is not None:
    text += f" The reference answer is {reference_answer}."
  return text


# ------------------------------------------------------------------------------------------------
# Verdicts.

STYLES = ("auto", "cft", "crl", "critique_rl")

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
_CFT_MARKER = "Conclusion"
_CRITIQUE_RL_MARKER = re.compile(r"correctness of the final answer", re.IGNORECASE)
_CRITIQUE_RL_WORD = re.compile(r"[\s:*_]*([A-Za-z]+)")
_CRITIQUE_RL_WORDS = {"correct": True, "right": True, "wrong": False, "incorrect": False}
_INT = re.compile(r"[+-]?\d+")
_BRACE = re.compile(r"(?<!\\)[{}]")  # an escaped brace (\{) is a literal, not a group

# A parser returns (position of the verdict marker, verdict) for the last marker, or None.
_Match = tuple[int, bool | None]


def remove_think(text: str) -> str:
  """Removes reasoning blocks so only the final answer is parsed.

  Drops every `<think>...</think>` block; then, if a `</think>` without its opening tag remains
  (the thinking began in the prompt), everything up to it; then, if a `<think>` is never closed
  (generation stopped while thinking), everything from it on.
  """
  text = _drop_think_blocks(text)
  close = text.rfind(_THINK_CLOSE)
  if close >= 0:
    text = text[close + len(_THINK_CLOSE):]
  open_ = text.find(_THINK_OPEN)
  if open_ >= 0:
    text = text[:open_]
  return text


def _drop_think_blocks(text: str) -> str:
  """`text` without its `<think>...</think>` blocks (each from an opening tag to the first closing
  tag after it), in one left-to-right pass: linear in len(text), however many tags are unclosed."""
  kept, position = [], 0
  while True:
    start = text.find(_THINK_OPEN, position)
    end = text.find(_THINK_CLOSE, start + len(_THINK_OPEN)) if start >= 0 else -1
    if end < 0:  # no further complete block
      kept.append(text[position:])
      return "".join(kept)
    kept.append(text[position:start])
    position = end + len(_THINK_CLOSE)


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
  last = None
  for last in pattern.finditer(text):
    pass
  return last


@functools.lru_cache(maxsize=16)
def _command_pattern(commands: tuple[str, ...]) -> re.Pattern[str]:
  return re.compile("(?:" + "|".join(map(re.escape, commands)) + r")\s*\{")


def last_braced_argument(text: str, *commands: str) -> tuple[int, str] | None:
  """(position, argument) of the LAST `\\command{...}` in text (any of `commands`), braces matched.

  A command includes its backslash, e.g. "\\boxed". Spaces between the command and "{" are
  allowed; escaped braces (`\\{`) are literals. Returns None when the command is absent or its
  last occurrence is never closed (a truncated answer is not replaced by an earlier one).
  """
  last = _last_match(_command_pattern(commands), text)
  if last is None:
    return None
  depth = 1
  for brace in _BRACE.finditer(text, last.end()):
    depth += 1 if brace.group() == "{" else -1
    if depth == 0:
      return last.start(), text[last.end():brace.start()]
  return None


def _parse_cft(text: str) -> _Match | None:
  start = text.rfind(_CFT_MARKER)
  if start < 0:
    return None
  tail = text[start + len(_CFT_MARKER):].lower()
  if "wrong" in tail or "incorrect" in tail:
    return start, False
  if "right" in tail or "correct" in tail:
    return start, True
  return start, None


def _parse_crl(text: str) -> _Match | None:
  found = last_braced_argument(text, r"\conclusion")
  if found is None:
    return None
  start, argument = found
  if "T" in argument:
    return start, True
  if "F" in argument:
    return start, False
  return start, None


def _parse_critique_rl(text: str) -> _Match | None:
  last = _last_match(_CRITIQUE_RL_MARKER, text)
  if last is None:
    return None
  word = _CRITIQUE_RL_WORD.match(text, last.end())
  verdict = _CRITIQUE_RL_WORDS.get(word.group(1).lower()) if word else None
  return last.start(), verdict


_PARSERS = {"cft": _parse_cft, "crl": _parse_crl, "critique_rl": _parse_critique_rl}


def parse_verdict(text: str, style: str = "auto", strip_think: bool = True) -> bool | None:
  """The critic's verdict: True (solution correct), False (wrong), None (no verdict found).

  Args:
    text: the generated critique.
    style: "cft" ("Conclusion: right/wrong"), "crl" ("\\conclusion{T|F}"), "critique_rl"
      ("Correctness of the final answer: Correct|Wrong") or "auto": every style is tried and the
      verdict whose marker comes last in the text wins.
    strip_think: drop `<think>` reasoning first (see `remove_think`).
  """
  if style not in STYLES:
    raise ValueError(f"parse_verdict: unknown style {style!r}; use one of {STYLES}")
  if strip_think:
    text = remove_think(text)
  parsers = _PARSERS.values() if style == "auto" else (_PARSERS[style],)
  matches = [m for m in (parse(text) for parse in parsers) if m is not None and m[1] is not None]
  if not matches:
    return None
  return max(matches, key=lambda m: m[0])[1]


# "First wrong step" answers: \boxed{k}. ProcessBench numbers steps from 0, DeepCritic from 1; both
# write -1 for "every step is correct". Parsed indices are always 0-based (-1 = no wrong step).
STEP_INDEXING = {"processbench": 0, "deepcritic": 1}


def parse_first_wrong_step(text: str, indexing: str = "processbench",
                           strip_think: bool = True) -> int | None:
  """The first wrong step named by the last `\\boxed{k}`, as a 0-based index (-1 = no wrong step).

  Args:
    text: the generated critique.
    indexing: how `k` counts steps: "processbench" (k = 0, 1, ...) or "deepcritic" (k = 1, 2, ...);
      -1 means "no wrong step" in both.
    strip_think: drop `<think>` reasoning first (see `remove_think`).

  Returns None when there is no closed `\\boxed{}`, its content is not an integer, or the integer
  is no step in the convention (below the first index and not -1, e.g. 0 under "deepcritic").
  """
  if indexing not in STEP_INDEXING:
    raise ValueError(f"parse_first_wrong_step: unknown indexing {indexing!r}; use one of "
                     f"{sorted(STEP_INDEXING)}")
  if strip_think:
    text = remove_think(text)
  found = last_braced_argument(text, r"\boxed")
  if found is None:
    return None
  argument = found[1].strip()
  if not _INT.fullmatch(argument):
    return None
  k, first = int(argument), STEP_INDEXING[indexing]
  if k == -1:
    return -1
  return k - first if k >= first else None
