"""Tests for cftjax.rewards.registry: registry, verdict/math/code rewards, routing, scaling, failures."""

from __future__ import annotations

import logging

import ml_collections
import pytest

from cftjax.config import base_config
from cftjax.data.critique import CritiqueRecord
from cftjax.rewards.grading import MathGrader
from cftjax.rewards.registry import (RewardComputer, RewardResult, extract_code, get_reward,
                                  register_reward, score_batch)


@register_reward("test_length")
def _length_reward(completion_text, record, per_char=1.0):
  del record
  return RewardResult(per_char * len(completion_text), "length")


@register_reward("test_raises")
def _raising_reward(completion_text, record):
  raise RuntimeError(f"boom on {record.id}")


@register_reward("test_batch_raises", batched=True)
def _batch_raising_reward(completions, records):
  if any(r.id == "bad" for r in records):
    raise RuntimeError("a bad record in the batch")
  return [RewardResult(1.0, "fine") for _ in completions]


def crl_record(label, source="crl", record_id="c"):
  return CritiqueRecord(question="q", solution="s", label=label, source=source, id=record_id)


def math_record(answer, record_id="m"):
  return CritiqueRecord(question="q", reference_answer=answer, source="math", id=record_id)


def code_record(tests, record_id="k"):
  return CritiqueRecord(question="q", tests=tests, source="code", id=record_id)


def python_block(code):
  return f"Here is my solution.\n```python\n{code}\n```\nDone."


@pytest.fixture(scope="module")
def grader():
  with MathGrader(num_workers=1, timeout_s=20.0) as math_grader:
    yield math_grader


def test_registry():
  assert get_reward("test_length")("abc", crl_record(True), per_char=2.0) == RewardResult(6.0, "length")
  with pytest.raises(ValueError, match="already registered"):
    register_reward("verdict")(_length_reward)
  with pytest.raises(KeyError, match="unknown reward 'nope'"):
    get_reward("nope")


@pytest.mark.parametrize("completion, label, style, expected", [
    (r"The solution is fine. \conclusion{T}", True, "auto", (1.0, "verdict matches label")),
    (r"The solution is fine. \conclusion{T}", False, "auto", (0.0, "verdict contradicts label")),
    (r"Step 2 is wrong. \conclusion{F}", False, "crl", (1.0, "verdict matches label")),
    ("Critique: ...\nConclusion: wrong [END]", False, "cft", (1.0, "verdict matches label")),
    (r"\conclusion{T}", True, "cft", (0.0, "no verdict")),   # style fixed to cft: CRL marker ignored
    (r"<think>\conclusion{T}</think> I am unsure.", True, "auto", (0.0, "no verdict")),
])
def test_verdict_reward(completion, label, style, expected):
  result = get_reward("verdict")(completion, crl_record(label), style=style)
  assert (result.score, result.reason) == expected and not result.error


def step_record(error_step, record_id="s0"):
  return CritiqueRecord(question="q", solution="a\n\nb\n\nc", steps=("a", "b", "c"),
                        error_step=error_step, id=record_id)


@pytest.mark.parametrize("completion, label, options, expected", [
    (r"Paragraph 1 is wrong. \boxed{1}", 1, {}, (1.0, "step matches label")),
    (r"\boxed{2}", 1, {}, (0.0, "wrong step 2 (label 1)")),
    (r"\boxed{-1}", -1, {}, (1.0, "step matches label")),
    (r"\boxed{-1}", 2, {}, (0.0, "step -1 contradicts label 2")),
    (r"\boxed{0}", -1, {}, (0.0, "step 0 contradicts label -1")),
    (r"**Answer**: \boxed{2}", 1, {"indexing": "deepcritic"}, (1.0, "step matches label")),
    (r"**Answer**: \boxed{1}", 1, {"indexing": "deepcritic"}, (0.0, "wrong step 0 (label 1)")),
    (r"**Answer**: \boxed{-1}", -1, {"indexing": "deepcritic"}, (1.0, "step matches label")),
    (r"\boxed{0}", 0, {"indexing": "deepcritic"}, (0.0, "no step index")),   # no step 0 counting from 1
    (r"\boxed{2}", 1, {"partial_credit": 0.25}, (0.25, "wrong step 2 (label 1)")),
    (r"\boxed{1}", -1, {"partial_credit": 0.25}, (0.0, "step 1 contradicts label -1")),
    (r"\boxed{-1}", 1, {"partial_credit": 0.25}, (0.0, "step -1 contradicts label 1")),
    ("I cannot tell.", 1, {}, (0.0, "no step index")),
])
def test_step_reward(completion, label, options, expected):
  result = get_reward("step")(completion, step_record(label), **options)
  assert (result.score, result.reason) == expected and not result.error


def test_step_reward_bad_input_names_the_record():
  result = get_reward("step")(r"\boxed{1}", step_record(None, record_id="s9"))
  assert result.error and "record 's9'" in result.reason and "error_step" in result.reason
  result = get_reward("step")(r"\boxed{1}", step_record(1), partial_credit=1.0)
  assert result.error and "partial_credit=1.0 must be in [0, 1)" in result.reason


def test_raising_reward_scores_zero_and_is_logged(caplog):
  with caplog.at_level(logging.WARNING, logger="cftjax.rewards.registry"):
    result = get_reward("test_raises")("x", crl_record(True, record_id="r7"))
  assert result == RewardResult(0.0, "error: RuntimeError: boom on r7", error=True)
  assert "boom on r7" in caplog.text
  # A missing label is bad input: reported the same way, naming the record.
  result = get_reward("verdict")(r"\conclusion{T}", crl_record(None, record_id="r8"))
  assert result.error and "record 'r8'" in result.reason and result.score == 0.0


def test_failing_batch_is_retried_item_by_item():
  records = [crl_record(True, record_id=i) for i in ("a", "bad", "b")]
  results = score_batch("test_batch_raises", ["x", "y", "z"], records)
  assert [r.score for r in results] == [1.0, 0.0, 1.0]
  assert [r.error for r in results] == [False, True, False]


def test_math_reward_batched(grader):
  records = [math_record(r"\frac{1}{2}"), math_record("3"), math_record("7"), math_record(None, "m4")]
  completions = [r"So the answer is \boxed{0.5}.", r"\boxed{4}", "I give up.", r"\boxed{1}"]
  results = score_batch("math", completions, records, grader=grader)
  assert [(r.score, r.reason) for r in results[:3]] == [
      (1.0, "correct"), (0.0, "wrong answer"), (0.0, "no boxed answer")]
  assert results[3].error and "no reference_answer" in results[3].reason
  # A box inside the reasoning block is not the final answer.
  thinking = get_reward("math")(r"<think>maybe \boxed{3}</think> It is \boxed{5}.", records[1],
                                grader=grader)
  assert (thinking.score, thinking.reason) == (0.0, "wrong answer")


def test_extract_code():
  assert extract_code(python_block("print(1)")) == "print(1)\n"
  text = "```\nprint(0)\n```\n```cpp\nint main(){}\n```\n```py\nprint(2)\n```\nthen ```text\nno\n```"
  assert extract_code(text) == "print(2)\n"
  assert extract_code("<think>```python\nprint(1)\n```</think>no code") is None
  assert extract_code("print(1)") is None


def test_code_reward():
  tests = {"inputs": ["1 2", "5 5"], "outputs": ["3", "10"]}
  records = [code_record(tests), code_record(tests), code_record(tests), code_record(tests),
             code_record(["assert f(2) == 4", "assert f(3) == 9"])]
  completions = [
      python_block("a, b = map(int, input().split())\nprint(a + b)"),
      python_block("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)"),
      "I would add the numbers.",
      python_block("while True:\n  pass"),
      python_block("def f(x):\n  return x * x"),
  ]
  results = score_batch("code", completions, records, wall_s=2.0, num_workers=4)
  assert [r.score for r in results] == [1.0, 0.5, 0.0, 0.0, 1.0]
  assert results[1].reason == "1/2 tests passed; first failure: wrong answer"
  assert results[2].reason == "no code block"
  assert results[3].reason == "0/2 tests passed; first failure: wall time limit"


def test_reward_computer_routes_scales_and_counts_errors(caplog):
  config = {"by_task": {"crl": "verdict", "math": "math", "code": "code"},
            "scale_by_source": {"crl": 0.8},
            "options": {"verdict": {"style": "crl"}, "code": {"wall_s": 2.0}},
            "math_grader": {"num_workers": 1, "timeout_s": 20.0}}
  items = [
      (r"\conclusion{F}", crl_record(False, source="crl"), "crl"),       # 1 * 0.8
      (r"\boxed{2}", math_record("2"), "math"),                          # 1
      (python_block("print(int(input()) * 2)"), code_record({"inputs": ["4"], "outputs": ["8"]}),
       "code"),                                                          # 1
      (r"\conclusion{T}", crl_record(False, source="other"), "crl"),     # 0, unscaled source
      (r"\conclusion{T}", crl_record(True, source="crl_extra"), "crl"),  # 1, unlisted source
      (r"\conclusion{T}", crl_record(None, record_id="nolabel"), "crl"),  # error -> 0
  ]
  completions, records, tasks = map(list, zip(*items))
  with RewardComputer(ml_collections.ConfigDict(config)) as computer:
    with caplog.at_level(logging.WARNING, logger="cftjax.rewards.registry"):
      results = computer(completions, records, tasks)
    assert [r.score for r in results] == pytest.approx([0.8, 1.0, 1.0, 0.0, 1.0, 0.0])
    assert [r.error for r in results] == [False] * 5 + [True]
    assert computer.error_count == 1
    assert "1 of 6 rewards failed" in caplog.text
    with pytest.raises(ValueError, match="no reward for task 'essay'"):
      computer(["x"], [crl_record(True)], ["essay"])


@pytest.mark.parametrize("config, message", [
    ({"by_task": {"crl": "verdict"}, "scale": {}}, r"unknown config keys \['scale'\]"),
    ({"by_task": {"crl": "verdikt"}}, "by_task.crl = 'verdikt' is not a registered reward"),
    ({}, "by_task must map"),
])
def test_reward_computer_config_errors(config, message):
  with pytest.raises(ValueError, match=message):
    RewardComputer(config)


def test_reward_computer_takes_the_code_options_from_rl_code():
  rl = base_config().rl
  rl.code.all_or_nothing = True
  record = code_record({"inputs": ["1 2", "5 5"], "outputs": ["3", "10"]})
  with RewardComputer(rl.rewards, code=rl.code) as computer:
    results = computer([python_block("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)")],
                       [record], ["code"])
  assert (results[0].score, results[0].reason) == (0.0, "1/2 tests passed; first failure: wrong answer")
  with pytest.raises(ValueError, match="remove rl.rewards.options.code"):
    RewardComputer({"by_task": {"code": "code"}, "options": {"code": {"wall_s": 1.0}}}, code=rl.code)
