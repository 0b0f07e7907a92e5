"""Readers of published critique-data rows (WebInstruct-CFT, one-shot CFT, verl RL parquet,
ProcessBench, PRM800K, MathCheck, DeepCritic, cftjax's own JSONL) from .jsonl / .json / .parquet
files into CritiqueRecords."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import math
import os
import re
from typing import Any, Callable, Iterator, Sequence

from cftjax.data.critique import CritiqueRecord, parse_first_wrong_step, parse_verdict

log = logging.getLogger(__name__)

ON_BAD_ROW = ("error", "skip")
# The fields that identify each format (all must be present), in detection order.
FORMAT_KEYS = {
    "cftjax": ("question",),
    "webinstruct": ("instruction", "input", "output"),
    "oneshot_cft": ("messages",),
    "verl": ("prompt", "reward_model"),
    "processbench": ("problem", "steps", "label"),
}
# Formats read only when named (their rows share fields with the formats above).
NAMED_ONLY_FORMATS = ("prm800k", "mathcheck", "deepcritic")
KNOWN_FORMATS = (*FORMAT_KEYS, *NAMED_ONLY_FORMATS)
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(CritiqueRecord))
TASKS = ("cft", "crl", "math", "code", "step")
# The fields each format reads; a row's other fields are kept in the record's metadata.
FORMAT_FIELDS = {
    "cftjax": (*_RECORD_FIELDS, "answer", "final_answer"),
    "webinstruct": ("instruction", "input", "output", "id"),
    "oneshot_cft": ("messages", "id"),
    "verl": ("prompt", "reward_model", "extra_info", "data_source", "ability"),
    "processbench": ("problem", "steps", "label", "final_answer_correct", "id"),
    "prm800k": ("question", "label"),
    "mathcheck": ("task_type", "question", "solution", "answer", "id"),
    "deepcritic": ("messages", "id"),
}
# "Question:\n...\n\nSolution:\n..." (CFT data), else inline "Question: ... Solution: ..." (Critique-Coder).
_QUESTION_SOLUTION = re.compile(
    r"Question:[ \t]*\n(?P<question>.*?)\n[ \t]*\n?[ \t]*Solution:[ \t]*\n(?P<solution>.*)", re.DOTALL)
_QUESTION_SOLUTION_INLINE = re.compile(r"Question:\s*(?P<question>.*?)\s+Solution:\s*(?P<solution>.*)",
                                       re.DOTALL)
_CRL_INSTRUCTION = re.compile(
    r"\s*Conclude with \\conclusion\{T\} for correct, \\conclusion\{F\} for wrong\.?\s*\Z")
_CRITIQUE_PREFIX = re.compile(r"\A\s*Critique:[ \t]*\n?")
# Fields holding a row's gold final answer (math RL and math eval alike), in lookup order.
ANSWER_FIELDS = ("reference_answer", "answer", "final_answer")
_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
_TRUE_WORDS = ("true", "t", "1", "yes", "correct", "right")
_FALSE_WORDS = ("false", "f", "0", "no", "incorrect", "wrong")


class DataError(ValueError):
  """A row or file that cannot be read; the message names the file, line/row and field.

  `reason` is a short category used to count skipped rows (e.g. "missing_field").
  """

  def __init__(self, message: str, reason: str = "bad_value"):
    super().__init__(message)
    self.reason = reason


class LoadedRecords(list):
  """The records of one file (a plain list) plus `skipped`: {reason: count} of skipped rows."""

  def __init__(self, records: list[CritiqueRecord], skipped: dict[str, int]):
    super().__init__(records)
    self.skipped = skipped


# ------------------------------------------------------------------------------- field access


def _get(row: dict[str, Any], name: str, where: str, types: type | tuple[type, ...],
         required: bool = True, path: str = "") -> Any:
  """row[name] checked against `types`; None when absent/None and not required."""
  label = f"{path}{name}"
  value = row.get(name) if isinstance(row, dict) else None
  if value is None:
    if required:
      raise DataError(f"{where}: missing field {label!r}", "missing_field")
    return None
  if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
    expected = " or ".join(t.__name__ for t in _as_tuple(types))
    raise DataError(f"{where}: field {label!r} must be {expected}, got {type(value).__name__}",
                    "wrong_type")
  return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
  return types if isinstance(types, tuple) else (types,)


def _nonempty(text: str, where: str, field: str, what: str = "text") -> str:
  if not text.strip():
    reason = "empty_critique" if what == "critique" else "empty_field"
    raise DataError(f"{where}: field {field!r}: the {what} is empty", reason)
  return text


def _split_question_solution(text: str, where: str, field: str) -> tuple[str, str]:
  match = _QUESTION_SOLUTION.search(text) or _QUESTION_SOLUTION_INLINE.search(text)
  if match is None:
    raise DataError(f"{where}: field {field!r} has no 'Question: ... Solution: ...' sections "
                    f"(starts {text[:80]!r})", "bad_value")
  question, solution = match["question"].strip(), match["solution"].strip()
  return _nonempty(question, where, field, "question"), solution


def _critique_body(text: str, where: str, field: str) -> str:
  """The critique after its "Critique:" header, kept byte-exact to the end (verdict, [END])."""
  body = _CRITIQUE_PREFIX.sub("", text, count=1)
  return _nonempty(body, where, field, "critique")


def _number_text(value: float | int) -> str:
  """27.0 -> "27"; other numbers as written."""
  if isinstance(value, float) and math.isfinite(value) and value.is_integer():
    return str(int(value))
  return str(value)


def gold_answer(row: dict[str, Any], where: str) -> str | None:
  """The gold final answer in the first of ANSWER_FIELDS the row has, None when it has none.

  A string (GSM8K's "... #### 42" keeps the part after ####), a number, or a list of answers
  (OlympiadBench's "$...$" strings, joined with ", ").
  """
  for field in ANSWER_FIELDS:
    value = row.get(field)
    if value is None or value == "" or value == []:
      continue
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return _number_text(value)
    if isinstance(value, (list, tuple)):
      return ", ".join(str(v).strip().strip("$").strip() for v in value)
    if isinstance(value, str):
      gsm8k = _GSM8K_ANSWER.search(value)
      return gsm8k.group(1).replace(",", "") if gsm8k else value.strip()
    raise DataError(f"{where}: field {field!r} must be a string, number or list, got "
                    f"{type(value).__name__}", "wrong_type")
  return None


def _verdict(critique: str) -> bool | None:
  return parse_verdict(critique, "cft")


def _row_id(row: dict[str, Any], where: str) -> str:
  value = row.get("id")
  return where if value is None else str(value)


# ------------------------------------------------------------------------- one parser per format


def _parse_webinstruct(row: dict[str, Any], where: str) -> dict[str, Any]:
  instruction = _get(row, "instruction", where, str).strip()
  question, solution = _split_question_solution(_get(row, "input", where, str), where, "input")
  critique = _critique_body(_get(row, "output", where, str), where, "output")
  return dict(question=question, solution=solution, critique=critique, label=_verdict(critique),
              instruction=instruction or None, id=_row_id(row, where))


def _parse_oneshot_cft(row: dict[str, Any], where: str) -> dict[str, Any]:
  messages = _messages(row, "messages", where)
  if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
    roles = [m["role"] for m in messages]
    raise DataError(f"{where}: field 'messages' must end with a user then an assistant turn, got "
                    f"roles {roles}", "bad_value")
  question, solution = _split_question_solution(messages[-2]["content"], where,
                                                "messages[-2].content")
  critique = _critique_body(messages[-1]["content"], where, "messages[-1].content")
  return dict(question=question, solution=solution, critique=critique, label=_verdict(critique),
              system=_system_turn(messages[:-2]), id=_row_id(row, where))


def _system_turn(messages: list[dict[str, str]]) -> str | None:
  """The system messages among `messages` (the turns before the question), joined; None if none."""
  texts = [m["content"] for m in messages if m["role"] == "system" and m["content"].strip()]
  return "\n\n".join(texts) or None


def _messages(row: dict[str, Any], name: str, where: str) -> list[dict[str, str]]:
  messages = _get(row, name, where, (list, tuple))
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise DataError(f"{where}: field '{name}[{i}]' must be a {{role, content}} object, got "
                      f"{type(message).__name__}", "wrong_type")
    _get(message, "role", where, str, path=f"{name}[{i}].")
    _get(message, "content", where, str, path=f"{name}[{i}].")
  return list(messages)


_VERL_ABILITY_TASKS = {"math": "math", "code": "code", "coding": "code", "critique": "crl", "crl": "crl"}


def _parse_verl(row: dict[str, Any], where: str) -> dict[str, Any]:
  """A verl RL row, routed per row: CRL when extra_info has `correctness`, code when it has tests
  (or `ability` is "code"), else math; the record's `task` says which.

  Code tests come from extra_info.inputs_outputs / .test_cases, or from reward_model.ground_truth
  when the row's `ability` is "code". System messages of `prompt` are kept as the record's system.
  """
  messages = _messages(row, "prompt", where)
  users = [m["content"] for m in messages if m["role"] == "user"]
  if not users:
    raise DataError(f"{where}: field 'prompt' has no user message", "bad_value")
  reward_model = _get(row, "reward_model", where, dict)
  extra = _get(row, "extra_info", where, dict, required=False) or {}
  data_source = _get(row, "data_source", where, str, required=False) or ""
  ability = (_get(row, "ability", where, str, required=False) or "").strip().lower()
  question = _get(extra, "question", where, str, required=False, path="extra_info.")
  fields = dict(question=question or users[-1], source=data_source, system=_system_turn(messages),
                id=_verl_id(extra, data_source, where))
  tests = _verl_tests(extra, where)
  if tests is None and _VERL_ABILITY_TASKS.get(ability) == "code":
    tests = _parse_tests(reward_model, "ground_truth", where, "reward_model.")
  if extra.get("correctness") is not None:
    fields["task"] = "crl"
    fields["label"] = _parse_bool(extra["correctness"], where, "extra_info.correctness")
    fields["solution"] = _get(extra, "solution", where, str, required=False, path="extra_info.")
    if fields["solution"] is None:
      prompt_question, solution = _split_question_solution(
          users[-1], where, "prompt (no extra_info.solution, so the user message must hold it)")
      fields["question"] = question or prompt_question
      fields["solution"] = _CRL_INSTRUCTION.sub("", solution)
    fields["tests"] = tests
  elif tests is not None:
    fields["task"] = "code"
    fields["tests"] = tests
  else:
    fields["task"] = "math"
    answer = reward_model.get("ground_truth")
    if answer is None or isinstance(answer, (dict, list)):
      raise DataError(f"{where}: field 'reward_model.ground_truth' must hold the reference answer "
                      f"of a math row, got {answer!r}",
                      "missing_field" if answer is None else "wrong_type")
    fields["reference_answer"] = str(answer)
  _nonempty(fields["question"], where, "extra_info.question" if question else "prompt", "question")
  return fields


def _verl_id(extra: dict[str, Any], data_source: str, where: str) -> str:
  index = extra.get("index", extra.get("id"))
  if index is None:
    return where
  return f"{data_source}-{index}" if data_source else str(index)


def _verl_tests(extra: dict[str, Any], where: str) -> Any:
  """extra_info.inputs_outputs ({"inputs", "outputs"}, maybe a JSON string) or .test_cases."""
  for name in ("inputs_outputs", "test_cases"):
    tests = _parse_tests(extra, name, where, "extra_info.")
    if tests is not None:
      return tests
  return None


def _parse_tests(holder: dict[str, Any], name: str, where: str, path: str) -> Any:
  """Tests under holder[name]: {"inputs": [...], "outputs": [...]} or a list of test strings."""
  value = holder.get(name)
  if value is None or (isinstance(value, (str, list, dict)) and not value):
    return None
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: field '{path}{name}' is not valid JSON: {e}",
                      "bad_value") from None
  is_io = (isinstance(value, dict) and isinstance(value.get("inputs"), list)
           and isinstance(value.get("outputs"), list))
  if not (is_io or isinstance(value, list)):
    raise DataError(f"{where}: field '{path}{name}' must hold tests as {{'inputs': [...], "
                    f"'outputs': [...]}} or a list, got {type(value).__name__}", "bad_value")
  return value


def _parse_bool(value: Any, where: str, field: str) -> bool:
  if isinstance(value, bool):
    return value
  if isinstance(value, (int, float)) and value in (0, 1):
    return bool(value)
  if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
    return value.strip().lower() in _TRUE_WORDS
  raise DataError(f"{where}: field {field!r} must be a boolean (or 'True'/'False'), got {value!r}",
                  "bad_value")


def _parse_processbench(row: dict[str, Any], where: str) -> dict[str, Any]:
  """label: 0-based earliest wrong step, -1 if none; the record's label is "no wrong step"."""
  steps = _get(row, "steps", where, (list, tuple))
  for i, step in enumerate(steps):
    if not isinstance(step, str):
      raise DataError(f"{where}: field 'steps[{i}]' must be str, got {type(step).__name__}",
                      "wrong_type")
  error_step = _get(row, "label", where, int)
  if not -1 <= error_step < len(steps):
    raise DataError(f"{where}: field 'label' = {error_step} must be -1 or a step index "
                    f"(0..{len(steps) - 1})", "bad_value")
  _get(row, "final_answer_correct", where, bool, required=False)
  question = _nonempty(_get(row, "problem", where, str), where, "problem", "question")
  return _step_record(question, steps, error_step, row, where)


def _step_record(question: str, steps: Sequence[str], error_step: int, row: dict[str, Any],
                 where: str, **fields: Any) -> dict[str, Any]:
  """Fields of a step-labelled record (task "step"): `error_step` 0-based, -1 = no wrong step."""
  return dict(question=question, solution="\n\n".join(steps), steps=tuple(steps),
              error_step=error_step, label=error_step == -1, task="step", id=_row_id(row, where),
              **fields)


def _parse_prm800k(row: dict[str, Any], where: str) -> dict[str, Any]:
  """A PRM800K row: question{problem, ground_truth_answer}, label{steps[{completions[{text,
  rating}], chosen_completion}], finish_reason}.

  The solution is the chosen completion of each step (a step's only completion when none is
  chosen, as in phase 2) up to and including the first one rated -1, whose index is the record's
  `error_step`. A solution with no step rated -1 is correct (-1) only when labelling finished
  (finish_reason "solution"); other rows (gave up, bad problem) carry no label and are refused.
  """
  question_info = _get(row, "question", where, dict)
  question = _nonempty(_get(question_info, "problem", where, str, path="question."), where,
                       "question.problem", "question")
  answer = question_info.get("ground_truth_answer")
  label = _get(row, "label", where, dict)
  raw_steps = _get(label, "steps", where, (list, tuple), path="label.")
  finish_reason = _get(label, "finish_reason", where, str, required=False, path="label.")
  steps, error_step = [], -1
  for i, step in enumerate(raw_steps):
    at = f"label.steps[{i}]."
    if not isinstance(step, dict):
      raise DataError(f"{where}: field 'label.steps[{i}]' must be an object, got "
                      f"{type(step).__name__}", "wrong_type")
    completions = _get(step, "completions", where, (list, tuple), path=at)
    chosen = _get(step, "chosen_completion", where, int, required=False, path=at)
    if chosen is None:
      rated_wrong = [c for c in completions if isinstance(c, dict) and c.get("rating") == -1]
      if len(completions) != 1 and not rated_wrong:
        raise DataError(f"{where}: field '{at}chosen_completion' is null and the step has "
                        f"{len(completions)} completions, none rated -1; cannot tell which one the "
                        "solution continues with", "bad_value")
      completion = completions[0] if len(completions) == 1 else rated_wrong[0]
    elif 0 <= chosen < len(completions):
      completion = completions[chosen]
    else:
      raise DataError(f"{where}: field '{at}chosen_completion' = {chosen} is not an index of its "
                      f"{len(completions)} completions", "bad_value")
    if not isinstance(completion, dict):
      raise DataError(f"{where}: a completion of 'label.steps[{i}]' must be an object, got "
                      f"{type(completion).__name__}", "wrong_type")
    steps.append(_get(completion, "text", where, str, path=f"{at}completions[]."))
    rating = completion.get("rating")
    if rating not in (-1, 0, 1, None):
      raise DataError(f"{where}: field '{at}completions[].rating' = {rating!r} must be -1, 0, 1 "
                      "or null", "bad_value")
    if rating == -1:
      error_step = i
      break
  if not steps:
    raise DataError(f"{where}: field 'label.steps' is empty", "empty_field")
  if error_step == -1 and finish_reason != "solution":
    raise DataError(f"{where}: no step is rated -1 and 'label.finish_reason' is "
                    f"{finish_reason!r}, not 'solution': the row has no first-wrong-step label",
                    "unlabelled")
  return _step_record(question, steps, error_step, row, where,
                      reference_answer=None if answer is None else str(answer))


_MATHCHECK_STEP = re.compile(r"^\s*Step\s+(\d+)\s*[:.]", re.MULTILINE | re.IGNORECASE)
_MATHCHECK_OUTCOMES = {"correct": True, "incorrect": False}


def _parse_mathcheck(row: dict[str, Any], where: str) -> dict[str, Any]:
  """A MathCheck checklist row {task_type, question, solution, answer}.

  process_judging: `answer` "Step k" names the first wrong step, counted from 1; the solution is
  split at its "Step n:" markers (else at blank lines) and k must name one of those steps.
  outcome_judging: `answer` "Correct" / "Incorrect" is the solution's correctness (task "crl").
  Other task types (solving, answerable_judging) judge no solution and are refused.
  """
  task_type = _get(row, "task_type", where, str)
  question = _nonempty(_get(row, "question", where, str), where, "question", "question")
  solution = _get(row, "solution", where, str)
  answer = _get(row, "answer", where, (str, int)) if task_type != "solving" else None
  if task_type == "outcome_judging":
    verdict = _MATHCHECK_OUTCOMES.get(str(answer).strip().lower())
    if verdict is None:
      raise DataError(f"{where}: field 'answer' = {answer!r} must be 'Correct' or 'Incorrect' for "
                      "an outcome_judging row", "bad_value")
    return dict(question=question, solution=solution, label=verdict, task="crl",
                id=_row_id(row, where))
  if task_type != "process_judging":
    raise DataError(f"{where}: field 'task_type' = {task_type!r}: only process_judging and "
                    "outcome_judging rows judge a solution", "other_task")
  match = re.fullmatch(r"\s*Step\s+(\d+)\s*\.?\s*", str(answer), re.IGNORECASE)
  if match is None:
    raise DataError(f"{where}: field 'answer' = {answer!r} must be 'Step k' for a process_judging "
                    "row", "bad_value")
  steps = _mathcheck_steps(solution)
  k = int(match[1])
  if not 1 <= k <= len(steps):
    raise DataError(f"{where}: field 'answer' = {answer!r} names no step of the solution (it has "
                    f"{len(steps)})", "bad_value")
  return _step_record(question, steps, k - 1, row, where)


def _mathcheck_steps(solution: str) -> list[str]:
  """The solution's steps: from each "Step n:" marker to the next, else its blank-line paragraphs."""
  starts = [m.start() for m in _MATHCHECK_STEP.finditer(solution)]
  if not starts:
    return [p.strip() for p in re.split(r"\n\s*\n", solution) if p.strip()]
  return [solution[a:b].strip() for a, b in zip(starts, [*starts[1:], len(solution)])]


def _parse_deepcritic(row: dict[str, Any], where: str) -> dict[str, Any]:
  """A DeepCritic SFT row {messages: [..., user, assistant]}: the user turn is the prompt as
  written (kept verbatim as `question`), the assistant turn the deliberate critique; its final
  "\\boxed{k}" (k counted from 1, -1 = every step correct) gives `error_step` (0-based)."""
  messages = _messages(row, "messages", where)
  if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
    roles = [m["role"] for m in messages]
    raise DataError(f"{where}: field 'messages' must end with a user then an assistant turn, got "
                    f"roles {roles}", "bad_value")
  question = _nonempty(messages[-2]["content"], where, "messages[-2].content", "question")
  critique = _nonempty(messages[-1]["content"], where, "messages[-1].content", "critique")
  error_step = parse_first_wrong_step(critique, indexing="deepcritic")
  if error_step is None:
    raise DataError(f"{where}: field 'messages[-1].content' has no final \\boxed{{k}} (k >= 1 or "
                    "-1) naming the first wrong step", "no_step_verdict")
  return dict(question=question, critique=critique, error_step=error_step, label=error_step == -1,
              task="step", system=_system_turn(messages[:-2]), id=_row_id(row, where))


_CFTJAX_FIELDS = (("question", str), ("solution", str), ("critique", str), ("label", bool),
                  ("error_step", int), ("steps", (list, tuple)), ("source", str), ("id", (str, int)),
                  ("system", str), ("instruction", str), ("task", str))


def _parse_cftjax(row: dict[str, Any], where: str) -> dict[str, Any]:
  """cftjax's own rows: CritiqueRecord fields; the gold answer under any of ANSWER_FIELDS; other
  fields become the record's metadata (`parse_row`)."""
  fields = {}
  for name, types in _CFTJAX_FIELDS:
    value = _get(row, name, where, types, required=name == "question")
    if value is not None:
      fields[name] = value
  answer = gold_answer(row, where)
  if answer is not None:
    fields["reference_answer"] = answer
  if "steps" in fields:
    fields["steps"] = tuple(fields["steps"])
  if "id" in fields:
    fields["id"] = str(fields["id"])
  if row.get("tests") is not None:
    fields["tests"] = row["tests"]
  if fields.get("task") is not None and fields["task"] not in TASKS:
    raise DataError(f"{where}: field 'task' = {fields['task']!r} must be one of {list(TASKS)}", "bad_value")
  _nonempty(fields["question"], where, "question", "question")
  if "critique" in fields:
    _nonempty(fields["critique"], where, "critique", "critique")
  fields.setdefault("id", where)
  return fields


_PARSERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "webinstruct": _parse_webinstruct,
    "oneshot_cft": _parse_oneshot_cft,
    "verl": _parse_verl,
    "processbench": _parse_processbench,
    "prm800k": _parse_prm800k,
    "mathcheck": _parse_mathcheck,
    "deepcritic": _parse_deepcritic,
    "cftjax": _parse_cftjax,
}


def parse_row(row: dict[str, Any], fmt: str, where: str, source: str | None = "") -> CritiqueRecord:
  """One row of format `fmt` as a CritiqueRecord; bad rows raise DataError naming `where`.

  CFT rows get their label from the critique's verdict (None when it has none). `source`
  overrides the record's source; otherwise the row's own (verl data_source, cftjax source) or the
  format name is used. Fields the format does not read (FORMAT_FIELDS) are kept in `metadata`.
  """
  if fmt not in _PARSERS:
    raise DataError(f"{where}: unknown format {fmt!r}; known formats: {list(KNOWN_FORMATS)}",
                    "unknown_format")
  if not isinstance(row, dict):
    raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}",
                    "not_an_object")
  fields = _PARSERS[fmt](row, where)
  fields["source"] = source or fields.get("source") or fmt
  metadata = {key: value for key, value in row.items() if key not in FORMAT_FIELDS[fmt] and value is not None}
  if fmt == "verl" and row.get("data_source"):
    metadata["data_source"] = row["data_source"]
  return CritiqueRecord(**fields, metadata=metadata or None)


def detect_format(row: dict[str, Any], where: str = "row") -> str:
  """The format whose identifying fields the row has (see FORMAT_KEYS)."""
  if isinstance(row, dict):
    for fmt, keys in FORMAT_KEYS.items():
      if all(key in row for key in keys):
        return fmt
  have = sorted(row) if isinstance(row, dict) else type(row).__name__
  known = "; ".join(f"{fmt}: {list(keys)}" for fmt, keys in FORMAT_KEYS.items())
  raise DataError(f"{where}: cannot tell the row's format from its fields {have}; known formats "
                  f"and the fields that identify them: {known}; formats read only when named "
                  f"(format=...): {list(NAMED_ONLY_FORMATS)}", "unknown_format")


# -------------------------------------------------------------------------------------- files


def read_rows(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """(where, row) for every row of a .jsonl, .json (a list of objects) or .parquet file.

  `where` names the file and line (JSONL) or row (JSON, Parquet). Bad rows raise DataError.
  """
  for where, row in iter_rows(path):
    if isinstance(row, DataError):
      raise row
    yield where, row


def iter_rows(path: str) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
  """Like read_rows, but a bad row is yielded as its DataError so callers may skip it (a file that
  cannot be read at all still raises)."""
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file", "missing_file")
  if path.endswith(".jsonl"):
    yield from _iter_jsonl(path)
  elif path.endswith(".json"):
    yield from _iter_json(path)
  elif path.endswith(".parquet"):
    yield from _iter_parquet(path)
  elif path.endswith(".arrow"):
    yield from _iter_arrow(path)
  else:
    raise DataError(f"{path}: unsupported file type; use .jsonl, .json (a list of objects), "
                    ".parquet or .arrow", "unsupported_file")


def _iter_jsonl(path: str) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
  with open(path, "rb") as f:
    for line_number, raw in enumerate(f, start=1):
      where = f"{path} line {line_number}"
      try:
        text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # tolerate a BOM
      except UnicodeDecodeError as e:
        yield where, DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})",
                               "not_utf8")
        continue
      if not text.strip():
        continue
      try:
        row = json.loads(text)
      except json.JSONDecodeError as e:
        yield where, DataError(f"{where}: malformed JSON: {e.msg} at column {e.colno}",
                               "malformed_json")
        continue
      yield where, _object_or_error(row, where)


def _iter_json(path: str) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
  try:
    with open(path, encoding="utf-8") as f:
      rows = json.load(f)
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})", "not_utf8") from None
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}",
                    "malformed_json") from None
  if not isinstance(rows, list):
    raise DataError(f"{path}: a .json data file must hold a list of row objects, got "
                    f"{type(rows).__name__} (use .jsonl for one object per line)", "not_an_object")
  for index, row in enumerate(rows):
    where = f"{path} row {index}"
    yield where, _object_or_error(row, where)


def _iter_parquet(path: str) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    parquet = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: not a readable Parquet file: {e}", "bad_file") from None
  index = 0
  for group in range(parquet.num_row_groups):
    try:
      rows = parquet.read_row_group(group).to_pylist()
    except (pa.ArrowException, OSError) as e:
      raise DataError(f"{path}: row group {group} (from row {index}) is unreadable: {e}",
                      "bad_file") from None
    for row in rows:
      yield f"{path} row {index}", row
      index += 1


def _iter_arrow(path: str) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
  """An Arrow IPC file as HF `datasets` writes it (the streaming format; the file format is read too)."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  try:
    with pa.memory_map(path) as source:
      try:
        table = pa.ipc.open_stream(source).read_all()
      except pa.ArrowInvalid:
        table = pa.ipc.open_file(source).read_all()
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: not a readable Arrow file: {e}", "bad_file") from None
  for index, row in enumerate(table.to_pylist()):
    yield f"{path} row {index}", row


def _object_or_error(row: Any, where: str) -> dict[str, Any] | DataError:
  if isinstance(row, dict):
    return row
  return DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}",
                   "not_an_object")


def pick_split(path: str, split: str, available: list[str]) -> str:
  """`split` if the dataset has it; "" picks a dataset's only split. Anything else is an error
  listing the splits (never another split than asked)."""
  if split in available:
    return split
  if not split and len(available) == 1:
    return available[0]
  if not split:
    raise ValueError(f"{path}: has splits {sorted(available)}; name one (a source's 'split', "
                     "data.eval_split for data.eval_path)")
  raise ValueError(f"{path}: no split {split!r}; available: {sorted(available)}")


def load_records(path: str | Sequence[str], fmt: str = "auto", on_bad_row: str = "error",
                 source: str | None = None) -> LoadedRecords:
  """All records of a file (or of several files, read in order, e.g. a dataset's shards). fmt
  "auto" detects the format from the first readable row.

  on_bad_row="error" raises DataError at the first bad row; "skip" skips bad rows and logs (and
  returns in `.skipped`) their count per reason. A file with no usable row is an error.
  """
  if on_bad_row not in ON_BAD_ROW:
    raise ValueError(f"on_bad_row={on_bad_row!r}; choose one of {ON_BAD_ROW}")
  if fmt != "auto" and fmt not in KNOWN_FORMATS:
    raise ValueError(f"unknown format {fmt!r}; known formats: {['auto', *KNOWN_FORMATS]}")
  paths = [path] if isinstance(path, str) else list(path)
  path = paths[0] if len(paths) == 1 else f"{os.path.commonpath(paths)} ({len(paths)} files)"
  records, skipped, first_errors = [], collections.Counter(), []
  for where, row in itertools.chain.from_iterable(iter_rows(p) for p in paths):
    try:
      if isinstance(row, DataError):
        raise row
      if fmt == "auto":
        fmt = detect_format(row, where)
        log.info("%s: detected format %r", path, fmt)
      records.append(parse_row(row, fmt, where, source))
    except DataError as e:
      if on_bad_row == "error":
        raise DataError(f"{e} (pass on_bad_row='skip' to skip bad rows)", e.reason) from None
      skipped[e.reason] += 1
      if len(first_errors) < 3:
        first_errors.append(str(e))
  extra_fields = sorted({key for record in records for key in (record.metadata or {})})
  if extra_fields:
    log.info("%s: fields %s are not read by format %r; kept as each record's metadata", path,
             extra_fields, fmt)
  if skipped:
    log.warning("%s: skipped %d bad row(s) %s; first: %s", path, sum(skipped.values()),
                dict(skipped), " | ".join(first_errors))
  if not records:
    detail = f" (skipped {dict(skipped)}: {' | '.join(first_errors)})" if skipped else ""
    raise DataError(f"{path}: no usable rows{detail}", "no_rows")
  return LoadedRecords(records, dict(skipped))
