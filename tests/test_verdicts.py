"""Tests for cftjax.data.verdicts: the four published verdict styles, think stripping, adversarial text."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cftjax.data.critique import (last_braced_argument, parse_first_wrong_step, parse_verdict,
                                  remove_think)

# Any unicode text without think tags (those get their own tests).
free_text = st.text(max_size=200).filter(lambda s: "think>" not in s)
verdict = st.booleans()


def verdict_suffix(style: str, value: bool) -> str:
  """A critique ending written the way each published style writes it."""
  if style == "cft":
    return f"\nConclusion: {'right' if value else 'wrong'} [END]"
  if style == "crl":
    return f"\n\\conclusion{{{'T' if value else 'F'}}}"
  return f"\nCorrectness of the final answer: {'Correct' if value else 'Wrong'}"


STYLES = ("cft", "crl", "critique_rl")


@settings(max_examples=150, deadline=None)
@given(prefix=free_text, style=st.sampled_from(STYLES), value=verdict)
def test_trailing_verdict_wins_in_its_style_and_auto(prefix, style, value):
  text = prefix + verdict_suffix(style, value)
  assert parse_verdict(text, style=style) is value
  assert parse_verdict(text, style="auto") is value


@settings(max_examples=100, deadline=None)
@given(prefix=free_text, middle=free_text, first=st.sampled_from(STYLES), second=st.sampled_from(STYLES),
       early=verdict, late=verdict)
def test_last_verdict_wins_across_styles(prefix, middle, first, second, early, late):
  text = prefix + verdict_suffix(first, early) + middle + verdict_suffix(second, late)
  assert parse_verdict(text, style="auto") is late


@settings(max_examples=100, deadline=None)
@given(text=free_text.filter(
    lambda s: not any(m in s.lower() for m in ("conclusion", "correctness of the final answer"))))
def test_no_marker_means_no_verdict(text):
  for style in ("auto",) + STYLES:
    assert parse_verdict(text, style=style) is None


@settings(max_examples=100, deadline=None)
@given(question=free_text, value=verdict)
def test_verdict_words_in_question_before_last_conclusion_are_ignored(question, value):
  # The question itself mentions conclusions and verdict words; only the last "Conclusion" counts.
  text = (f"Question: Conclusion: {'wrong' if value else 'right'}? {question} is incorrect or correct"
          f"{verdict_suffix('cft', value)}")
  assert parse_verdict(text, style="cft") is value


@pytest.mark.parametrize("text, expected", [
    ("Conclusion: incorrect [END]", False),   # "incorrect" contains "correct": checked first
    ("Conclusion: correct [END]", True),
    ("Conclusion: RIGHT", True),
    ("Conclusion: Wrong.", False),
    ("Conclusion: the solution is not right", True),   # the published rule reads words, not negation
    ("Conclusion: right ... wait, it is wrong", False),  # any "wrong" after the last marker wins
    ("Conclusion: unclear", None),
    ("conclusion: right", None),   # the published marker is capitalised "Conclusion"
    ("Conclusion: right\nConclusion:", None),   # only the text after the LAST marker counts
])
def test_cft_table(text, expected):
  assert parse_verdict(text, style="cft") is expected


@pytest.mark.parametrize("text, expected", [
    (r"\conclusion{T}", True),
    (r"\conclusion{F}", False),
    (r"\conclusion{T} then \conclusion{F}", False),
    (r"\conclusion{ \textbf{T} }", True),   # nested braces
    (r"\conclusion {F}", False),
    (r"\conclusion{x}", None),
    (r"\conclusion{T} and a truncated \conclusion{F", None),  # last marker unclosed: no verdict
    (r"\conclusion{\{T\}}", True),
])
def test_crl_table(text, expected):
  assert parse_verdict(text, style="crl") is expected


@pytest.mark.parametrize("text, expected", [
    ("Correctness of the final answer: Correct", True),
    ("Correctness of the final answer: Incorrect", False),
    ("correctness of the final answer: **Wrong**", False),
    ("Correctness of the final answer: Correct\nCorrectness of the final answer: Wrong", False),
    ("Correctness of the final answer: maybe", None),
])
def test_critique_rl_table(text, expected):
  assert parse_verdict(text, style="critique_rl") is expected


@settings(max_examples=100, deadline=None)
@given(thought=st.text(max_size=200), after=free_text, style=st.sampled_from(STYLES), value=verdict)
def test_think_blocks_are_ignored(thought, after, style, value):
  answer = after + verdict_suffix(style, value)
  # A closed block (its content may hold anything, even think tags and other verdicts).
  assert parse_verdict(f"<think>{thought}{verdict_suffix(style, not value)}</think>{answer}") is value
  # Thinking that began in the prompt: only the closing tag is generated.
  assert parse_verdict(f"{thought}{verdict_suffix(style, not value)}</think>{answer}") is value
  # Without stripping, the thought's verdict may be read; the final one still wins when last.
  assert parse_verdict(f"<think>x</think>{answer}", strip_think=False) is value


@settings(max_examples=100, deadline=None)
@given(before=free_text, thought=free_text, style=st.sampled_from(STYLES), value=verdict)
def test_unclosed_think_block_is_dropped(before, thought, style, value):
  text = before + "<think>" + thought + verdict_suffix(style, value)
  assert parse_verdict(text) == parse_verdict(before)
  assert remove_think(text) == before


@settings(max_examples=100, deadline=None)
@given(prefix=free_text, step=st.integers(-1, 10**6))
def test_processbench_last_box(prefix, step):
  assert parse_first_wrong_step(prefix + rf"\boxed{{{step}}}") == step
  assert parse_first_wrong_step(rf"\boxed{{{step + 1}}}" + prefix + rf"\boxed{{ {step} }}") == step


@pytest.mark.parametrize("text, expected", [
    (r"\boxed{3}", 3),
    (r"\boxed{-1}", -1),
    (r"\boxed{2} and \boxed{5}", 5),
    (r"\boxed{\text{3}}", None),
    (r"\boxed{three}", None),
    ("no box", None),
    (r"\boxed{4", None),
    (r"<think>\boxed{1}</think>\boxed{2}", 2),
])
def test_processbench_table(text, expected):
  assert parse_first_wrong_step(text) == expected


@pytest.mark.parametrize("text, expected", [
    (r"**Answer**: \boxed{1}", 0),          # DeepCritic counts steps from 1
    (r"**Answer**: \boxed{4}", 3),
    (r"**Answer**: \boxed{-1}", -1),        # every step correct
    (r"\boxed{0}", None),                   # no step 0 when counting from 1
    (r"\boxed{-2}", None),
    (r"\boxed{ 2 }", 1),
])
def test_deepcritic_indexing_table(text, expected):
  assert parse_first_wrong_step(text, indexing="deepcritic") == expected


@settings(max_examples=100, deadline=None)
@given(prefix=free_text, step=st.integers(-1, 10**6))
def test_both_indexings_name_the_same_step(prefix, step):
  one_based = step + 1 if step >= 0 else -1
  assert parse_first_wrong_step(prefix + rf"\boxed{{{one_based}}}", indexing="deepcritic") == step


def test_processbench_rejects_negative_other_than_minus_one():
  assert parse_first_wrong_step(r"\boxed{-3}") is None


def test_unknown_indexing_is_rejected():
  with pytest.raises(ValueError, match="unknown indexing 'two'"):
    parse_first_wrong_step(r"\boxed{1}", indexing="two")


@settings(max_examples=100, deadline=None)
@given(depth=st.integers(1, 30), inner=st.text(alphabet="ab+-12", max_size=5), prefix=free_text)
def test_last_braced_argument_matches_nested_braces(depth, inner, prefix):
  argument = "{" * depth + inner + "}" * depth
  position, found = last_braced_argument(prefix + r"\boxed{" + argument + "} tail}", r"\boxed")
  assert found == argument
  assert position == len(prefix)


def test_unknown_style_is_rejected():
  with pytest.raises(ValueError, match="unknown style 'xml'"):
    parse_verdict("Conclusion: right", style="xml")


def test_very_long_text_is_fast():
  noise = "Conclusion { } \\conclusion{ Correctness ü 数学 " * 40_000   # ~2 MB of near-markers
  text = noise + verdict_suffix("crl", False)
  start = time.perf_counter()
  assert parse_verdict(text) is False
  assert parse_verdict(noise + verdict_suffix("cft", True)) is True
  assert parse_first_wrong_step(noise + r"\boxed{7}") == 7
  assert time.perf_counter() - start < 5.0


def test_many_unclosed_think_tags_are_linear():
  # 32k unclosed tags (a degenerate sample of a thinking model): the regex this replaced rescanned
  # to the end from every tag (about 30 s here); one pass takes milliseconds.
  text = "<think> step" * 32_000 + "Conclusion: right"
  start = time.perf_counter()
  assert remove_think(text) == ""
  assert remove_think("answer " + text + "</think>tail") == "answer tail"
  assert time.perf_counter() - start < 1.0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["<think>", "</think>", "a", " b", "<th", "ink>", "\n"]), max_size=14))
def test_remove_think_matches_its_definition(pieces):
  import re  # pylint: disable=import-outside-toplevel
  text = "".join(pieces)
  expected = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)  # the definition, for short text
  if "</think>" in expected:
    expected = expected[expected.rfind("</think>") + len("</think>"):]
  if "<think>" in expected:
    expected = expected[:expected.find("<think>")]
  assert remove_think(text) == expected
