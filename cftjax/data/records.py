"""The `CritiqueRecord`: one (question, candidate solution) pair with whatever supervision it carries.

Every reader turns its published row shape into this record; templates and rewards consume it.
"""

from __future__ import annotations

import dataclasses
from typing import Any


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
