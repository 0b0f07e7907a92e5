"""A rule-based stand-in for an LLM teacher on the synthetic world's additions (CPU demos and tests).

`SyntheticAdditionTeacher` writes the world's own column-by-column critique
(`cftjax.data.synthetic.addition_critique`) of a candidate's last \\boxed{} answer, ending in the CFT
verdict line; it reads no model and never errs. A config names it as a teacher with
{"rule": "synthetic_addition"}; it only understands questions of the form "What is A + B?".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cftjax.data import synthetic
from cftjax.rewards.grading import extract_boxed

RULES = ("synthetic_addition",)
_QUESTION = re.compile(r"^What is (\d+) \+ (\d+)\?$")


class SyntheticAdditionTeacher:
  """Critiques answers to "What is A + B?" exactly, as the synthetic world's teacher does."""

  name = "rule:synthetic_addition"

  def critique_each(self, question: str, solutions: Sequence[str]) -> list[str]:
    """One critique per solution: the column check of its last boxed answer against A + B (no boxed
    answer: every column reads "_", so the verdict is wrong)."""
    match = _QUESTION.match(question.strip())
    if match is None:
      raise ValueError(f"teacher {self.name!r} critiques synthetic additions only ('What is A + B?'), got "
                       f"question {question[:80]!r}; use a ckpt or endpoint teacher for other problems")
    a, b = int(match.group(1)), int(match.group(2))
    return [synthetic.addition_critique(a, b, (extract_boxed(s) or "").strip()) for s in solutions]


def rule_teacher(rule: str, where: str) -> SyntheticAdditionTeacher:
  if rule not in RULES:
    raise ValueError(f"{where}.rule={rule!r} is not one of {RULES}")
  return SyntheticAdditionTeacher()
