"""Prompt templates: how a CritiqueRecord becomes chat messages, SFT ids + loss mask, or a prompt.
Templates are Python format strings over a record's fields (literal braces written doubled)."""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Mapping

import numpy as np

from cftjax.data.records import CritiqueRecord

PLACEHOLDERS = ("question", "solution", "critique", "reference_answer")
SPEC_KEYS = ("system", "user", "assistant")

CFT_USER = (
    "Please critique whether the following solution to the question is correct.\n\n"
    "Question:\n{question}\n\nSolution:\n{solution}\n\n"
)
CRL_USER = (
    "You will be given a question (problem specification) and a submitted solution. Your task is to "
    "determine whether the solution is correct and fully satisfies the specification.\n\n"
    "Question:\n{question}\n\nSolution:\n{solution}\n\n"
    "Conclude with \\conclusion{{T}} for correct, \\conclusion{{F}} for wrong."
)
MATH_COT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{{}}."
CODE_USER = (
    "{question}\n\nWrite a complete Python 3 program that solves the problem above, reading from "
    "standard input and writing to standard output. Put the whole program in one ```python code block."
)


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """Format strings for the system, user and assistant turns (placeholders: PLACEHOLDERS)."""

  name: str
  user: str
  system: str | None = None
  assistant: str | None = None

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
    turns = [("system", self.system), ("user", self.user)]
    if with_target:
      if self.assistant is None:
        raise ValueError(f"template {self.name!r} has no assistant turn; it can only build prompts "
                         "(with_target=False)")
      turns.append(("assistant", self.assistant))
    return [{"role": role, "content": self._fill(text, record, role)}
            for role, text in turns if text is not None]

  def _fill(self, text: str, record: CritiqueRecord, role: str) -> str:
    values = {}
    for field in _placeholders(text, self.name, role):
      value = getattr(record, field)
      if value is None:
        raise ValueError(f"record {record.id!r}: field {field!r} is None but template "
                         f"{self.name!r} uses {{{field}}} in its {role} turn")
      values[field] = value
    return text.format(**values)


def _placeholders(text: str, name: str, key: str) -> list[str]:
  try:
    parsed = list(string.Formatter().parse(text))
  except ValueError as e:
    raise ValueError(f"template {name!r}: bad format string in {key!r}: {e} (write literal "
                     "braces doubled)") from None
  return [field for _, field, _, _ in parsed if field is not None]


BUILTIN_TEMPLATES = {
    "cft": PromptTemplate("cft", user=CFT_USER, assistant="Critique:\n{critique}"),
    "crl": PromptTemplate("crl", user=CRL_USER, assistant="{critique}"),
    "math_cot": PromptTemplate("math_cot", system=MATH_COT_SYSTEM, user="{question}",
                               assistant="{solution}"),
    "code": PromptTemplate("code", user=CODE_USER, assistant="{solution}"),
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
  unknown_keys = sorted(set(spec) - set(SPEC_KEYS))
  if unknown_keys:
    raise ValueError(f"template {name!r}: unknown key(s) {unknown_keys}; allowed: "
                     f"{list(SPEC_KEYS)}")
  if not spec.get("user"):
    raise ValueError(f"template {name!r}: 'user' is required (e.g. '{{question}}')")
  return PromptTemplate(name, user=spec["user"], system=spec.get("system"),
                        assistant=spec.get("assistant"))


def render_sft(record: CritiqueRecord, template: PromptTemplate | str, tokenizer
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
