"""Tests for cftjax.rewards.grading: boxed-answer extraction and math-verify grading in worker processes."""

from __future__ import annotations

import time

import pytest

from cftjax.rewards.grading import MathGrader, extract_boxed, grade_math


@pytest.fixture(scope="module")
def grader():
  with MathGrader(num_workers=2, timeout_s=20.0) as math_grader:
    yield math_grader


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{5}.", "5"),
    (r"\boxed{1} then \boxed{2}", "2"),
    (r"\boxed{1} then \fbox{2}", "2"),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed {7}", "7"),
    (r"\boxed{}", ""),
    ("no box here", None),
    (r"\boxed{3} and a truncated \boxed{\frac{1}{2", None),   # last box unclosed: no answer
    (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),     # escaped brace is not a group
])
def test_extract_boxed(text, expected):
  assert extract_boxed(text) == expected


# (gold, prediction, expected correct, expected reason) measured with math-verify 0.9.0. Where its
# answer differs from mathematical truth, the comment says so; these document the grader as it is.
MATH_CASES = [
    # Equivalent numeric forms.
    (r"\frac{1}{2}", r"\boxed{0.5}", True, "correct"),
    (r"\frac{1}{2}", r"\boxed{1/2}", True, "correct"),
    ("0.5", r"\boxed{\dfrac12}", True, "correct"),
    (r"\frac12", r"\boxed{\frac{1}{2}}", True, "correct"),
    (r"\frac{1}{2}", r"\boxed{\frac{2}{4}}", True, "correct"),
    ("0.5", r"\boxed{.5}", True, "correct"),
    ("10", r"\boxed{10.0}", True, "correct"),
    ("1000", r"\boxed{1,000}", True, "correct"),
    ("-1", r"\boxed{- 1}", True, "correct"),
    (r"\frac{1}{3}", r"\boxed{0.3333333}", True, "correct"),   # truth: not equal (rounded to 6 places)
    (r"\frac{1}{3}", r"\boxed{0.333}", False, "wrong answer"),
    # Roots, pi, algebra.
    (r"2\sqrt{2}", r"\boxed{\sqrt{8}}", True, "correct"),
    (r"\sqrt{2}/2", r"\boxed{\frac{1}{\sqrt{2}}}", True, "correct"),
    ("3", r"\boxed{\sqrt{9}}", True, "correct"),
    (r"2\pi", r"\boxed{\pi\cdot 2}", True, "correct"),
    (r"\pi", r"\boxed{3.14159}", False, "wrong answer"),
    ("x^2+2x+1", r"\boxed{(x+1)^2}", True, "correct"),
    ("x+1", r"\boxed{1+x}", True, "correct"),
    ("y=2x+1", r"\boxed{2x+1}", True, "correct"),   # equation vs its right side accepted
    ("3", r"\boxed{x=3}", True, "correct"),
    (r"\infty", r"\boxed{\infty}", True, "correct"),
    # Intervals and sets.
    ("[1,2)", r"\boxed{[1,2)}", True, "correct"),
    ("[1,2)", r"\boxed{(1,2]}", False, "wrong answer"),
    ("(1,2)", r"\boxed{1<x<2}", False, "wrong answer"),   # truth: same set (inequality not compared)
    (r"(-\infty, 3]", r"\boxed{x \le 3}", False, "wrong answer"),   # truth: same set
    (r"\{1,2\}", r"\boxed{\{2,1\}}", True, "correct"),
    (r"\{1,2\}", r"\boxed{2, 1}", True, "correct"),
    ("1,2", r"\boxed{\{1,2,3\}}", False, "wrong answer"),
    # Percent, units, currency, degrees.
    (r"50\%", r"\boxed{0.5}", True, "correct"),
    ("50", r"\boxed{50\%}", True, "correct"),   # truth: 0.5 != 50 (the percent sign is dropped)
    ("5", r"\boxed{5 cm}", True, "correct"),
    ("5", r"\boxed{5\text{ cm}}", True, "correct"),
    ("5", r"\boxed{5\,\mathrm{cm}}", True, "correct"),
    ("5", r"\boxed{\text{5 cm}}", False, "wrong answer"),   # truth: same answer (unit inside \text)
    (r"5\text{ cm}", r"\boxed{5}", True, "correct"),
    (r"\$5", r"\boxed{5}", True, "correct"),
    ("12", r"\boxed{12^\circ}", True, "correct"),
    # Choices and text.
    ("A", r"\boxed{A}", True, "correct"),
    ("A", r"\boxed{B}", False, "wrong answer"),
    ("A", r"\boxed{\text{(A)}}", True, "correct"),
    (r"\text{Monday}", r"\boxed{Monday}", True, "correct"),
    # Matrices and nested braces.
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", True, "correct"),
    (r"\frac{\sqrt{3}}{2}", r"\boxed{\frac{{\sqrt{3}}}{2}}", True, "correct"),
    # Gold given with its own box or dollars.
    (r"The answer is \boxed{7}", r"\boxed{7}", True, "correct"),
    ("$7$", r"\boxed{7}", True, "correct"),
    # No box, several boxes, malformed LaTeX.
    ("3", "The answer is 3.", False, "no boxed answer"),
    ("3", r"\boxed{3} then \boxed{4}", False, "wrong answer"),
    ("4", r"\boxed{3} then \boxed{4}", True, "correct"),
    ("3", r"\boxed{\frac{3}", False, "no boxed answer"),   # unbalanced: the box never closes
    ("3", r"\boxed{}", False, "unparsable answer"),
    ("3", r"\fbox{3}", True, "correct"),
    # The grader reads the answer after <think> blocks, in its worker (remove_think).
    ("5", r"<think>maybe \boxed{5}</think> so \boxed{3}", False, "wrong answer"),
    ("5", r"<think>maybe \boxed{3}</think> so \boxed{5}", True, "correct"),
    ("5", r"<think>still going \boxed{5}", False, "no boxed answer"),
    ("5", "<think>" * 32768 + r"\boxed{5}", False, "no boxed answer"),
]


def test_math_table(grader):
  golds, preds, expected, _ = zip(*MATH_CASES)
  results = grader.grade_many(golds, preds)
  mismatches = [(case, got) for case, got in zip(MATH_CASES, results) if got != case[2:]]
  assert not mismatches
  assert [correct for correct, _ in results] == list(expected)


def test_hung_worker_is_killed_and_replaced(grader):
  # sympy evaluates 9^(9^9) exactly, which takes far longer than the limit.
  start = time.perf_counter()
  assert grader.grade("1", r"\boxed{9^{9^{9}}}", timeout_s=1.0) == (False, "timeout")
  assert time.perf_counter() - start < 10.0
  # Every worker (including the replacement) still grades.
  assert grader.grade_many(["2"] * 4, [r"\boxed{2}"] * 4) == [(True, "correct")] * 4


def test_grade_many_keeps_order_and_checks_lengths(grader):
  golds = [str(i) for i in range(6)]
  preds = [rf"\boxed{{{i if i % 2 else i + 1}}}" for i in range(6)]
  assert [c for c, _ in grader.grade_many(golds, preds)] == [i % 2 == 1 for i in range(6)]
  assert grader.grade_many([], []) == []
  with pytest.raises(ValueError, match="2 golds but 1 preds"):
    grader.grade_many(["1", "2"], [r"\boxed{1}"])


def test_closed_grader_refuses_work():
  math_grader = MathGrader(num_workers=1, timeout_s=5.0)
  math_grader.close()
  with pytest.raises(RuntimeError, match="after close"):
    math_grader.grade("1", r"\boxed{1}")
  with pytest.raises(ValueError, match="num_workers"):
    MathGrader(num_workers=0)


def test_grade_math_single_call():
  assert grade_math(r"\frac{3}{4}", r"Thus \boxed{0.75}.", timeout_s=20.0) == (True, "correct")
  assert grade_math("3", r"\boxed{4}", timeout_s=20.0) == (False, "wrong answer")
  assert grade_math(12, r"\boxed{12}", timeout_s=20.0) == (True, "correct")   # non-str gold (JSON int)


def test_workers_have_a_memory_limit():
  with MathGrader(num_workers=1, timeout_s=30.0, memory_mb=400) as small:
    assert small.grade("2", r"\boxed{2}") == (True, "correct")
    (worker,) = small._workers
    with open(f"/proc/{worker._process.pid}/limits") as f:
      limit = next(line for line in f if line.startswith("Max address space"))
    assert limit.split()[3:5] == [str(400 << 20)] * 2
