"""Tests of the synthetic critique world: determinism, balance, splits, critiques, no shortcuts."""

from __future__ import annotations

import collections
import json
import os
import random
import re

import numpy as np
import pytest

from cftjax.data import readers, synthetic
from cftjax.data.critique import (get_template, parse_first_wrong_step, parse_verdict, render_prompt,
                                  render_cft)
from cftjax.tokenizer import Tokenizer

_PROBLEM = re.compile(r"What is (\d+) \+ (\d+)\?")
_SOLUTION = re.compile(r"(\d+) \+ (\d+) = (\d+)")
_COLUMN = re.compile(r"(\d)\+(\d)\+(\d)=(\d\d) vs (\d) (ok|no)")
_FINAL_CARRY = re.compile(r"carry 1 vs (\d) (ok|no)")


@pytest.fixture(scope="module")
def world():
  return synthetic.make_world(seed=3, num_train=3000, num_heldout=2000)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("world")
  return synthetic.write_world(str(out), seed=1, num_train=400, num_heldout=100)


def _operands(record):
  a, b, claimed = _SOLUTION.fullmatch(record.solution).groups()
  assert _PROBLEM.fullmatch(record.question).groups() == (a, b)
  return int(a), int(b), claimed


def test_write_world_is_deterministic_and_seeded(tmp_path, world_dir):
  again = synthetic.write_world(str(tmp_path / "again"), seed=1, num_train=400, num_heldout=100)
  assert set(again) == set(world_dir)
  for name in ("train", "heldout", "rl_math_train", "rl_crl_heldout"):
    with open(world_dir[name], "rb") as f1, open(again[name], "rb") as f2:
      assert f1.read() == f2.read(), name
  for name in ("tokenizer.model", "tokenizer_config.json"):
    with open(os.path.join(world_dir["tokenizer"], name), "rb") as f1, \
        open(os.path.join(again["tokenizer"], name), "rb") as f2:
      assert f1.read() == f2.read(), name
  other = synthetic.make_world(seed=2, num_train=400, num_heldout=100)
  assert [r.solution for r in other["train"]] != [
      r.solution for r in readers.load_records(world_dir["train"])]


def test_files_load_back_as_the_same_records(world_dir):
  world = synthetic.make_world(seed=1, num_train=400, num_heldout=100)
  for split in ("train", "heldout"):
    assert list(readers.load_records(world_dir[split])) == world[split]
  crl = readers.load_records(world_dir["rl_crl_train"])
  assert all(r.critique is None and r.label is not None and r.solution for r in crl)
  math = readers.load_records(world_dir["rl_math_train"])
  assert all(r.solution == "" and r.label is None and r.reference_answer for r in math)
  assert [r.reference_answer for r in math] == [str(sum(_operands(r)[:2])) for r in world["train"]]


def test_labels_are_balanced_and_heldout_is_disjoint(world):
  for split, records in world.items():
    labels = collections.Counter(r.label for r in records)
    assert abs(labels[True] - labels[False]) <= 1, split
  pairs = {split: [frozenset(_operands(r)[:2]) for r in records] for split, records in world.items()}
  assert len(set(pairs["train"])) == len(pairs["train"])
  assert len(set(pairs["heldout"])) == len(pairs["heldout"])
  assert not set(pairs["train"]) & set(pairs["heldout"])


def test_critique_recomputes_the_sum_and_its_verdict_matches_the_label(world):
  with_carry_out = synthetic.make_world(seed=4, num_train=500, num_heldout=10, carry_out=True)
  sums = [sum(_operands(r)[:2]) for r in with_carry_out["train"]]
  assert max(sums) >= 1000 and max(sum(_operands(r)[:2]) for r in world["train"]) <= 999
  for record in world["train"][:1000] + world["heldout"][:500] + with_carry_out["train"]:
    a, b, claimed = _operands(record)
    assert record.label == (claimed == str(a + b))
    assert record.reference_answer == str(a + b)
    assert record.critique.endswith("Conclusion: right [END]" if record.label
                                    else "Conclusion: wrong [END]")
    assert parse_verdict(record.critique, "cft") is record.label
    columns = _COLUMN.findall(record.critique)
    assert len(columns) == 3
    carry, digits = 0, []
    for i, (x, y, carry_in, total, said, flag) in enumerate(columns):
      assert (int(x), int(y)) == (a // 10**i % 10, b // 10**i % 10)
      assert int(carry_in) == carry and int(total) == int(x) + int(y) + carry
      carry = int(total) // 10
      digits.append(total[1])
      assert said == claimed[::-1][i] and flag == ("ok" if said == total[1] else "no")
    final = _FINAL_CARRY.findall(record.critique)
    assert len(final) == carry
    recomputed = "".join(reversed(digits + ["1"] * carry))
    assert recomputed == str(a + b)


def test_wrong_answers_are_plausible_slips(world):
  kinds = collections.Counter()
  rng = random.Random(0)
  with_carry_out = synthetic.make_world(seed=5, num_train=300, num_heldout=10, carry_out=True)
  for max_sum, records in ((999, world["train"][:300]), (None, with_carry_out["train"])):
    for record in records:
      a, b, _ = _operands(record)
      wrong, kind = synthetic.plausible_wrong_sum(a, b, rng, max_sum)
      kinds[kind] += 1
      true_sum = str(a + b)
      assert wrong != true_sum and len(wrong) == len(true_sum)
      assert wrong[0] == true_sum[0]
      assert 200 <= int(wrong) <= (max_sum or 1998)
  assert set(kinds) == set(synthetic.ERROR_KINDS)


def test_addition_critique_handles_length_mismatch():
  short = synthetic.addition_critique(999, 1, "100")
  assert short.endswith("Conclusion: wrong [END]") and "carry 1 vs _ no" in short
  longer = synthetic.addition_critique(12, 30, "042")
  assert longer.endswith("Conclusion: wrong [END]") and "carry 0 vs 0 no" in longer
  assert synthetic.addition_critique(12, 30, "42").endswith("Conclusion: right [END]")


def _surface_features(record) -> dict[str, np.ndarray]:
  a, b, claimed = _operands(record)
  last = np.eye(10)[int(claimed[-1])]
  first = np.eye(10)[int(claimed[0])]
  hist = np.bincount([int(d) for d in claimed], minlength=10).astype(float)
  operand_hist = np.bincount([int(d) for d in f"{a}{b}"], minlength=10).astype(float)
  return {"length": np.array([len(claimed) == 4], float), "last_digit": last, "first_digit": first,
          "digit_histogram": hist,
          "all": np.concatenate([[len(claimed)], last, first, hist, operand_hist])}


def _logistic_regression(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
  """Weights [1 + features] (bias first) fitted by Newton's method (x: [n, features], y: [n])."""
  x = np.c_[np.ones(len(x)), x]
  w = np.zeros(x.shape[1])
  for _ in range(25):
    p = 1 / (1 + np.exp(-x @ w))
    hessian = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(len(w))
    w -= np.linalg.solve(hessian, x.T @ (p - y) + ridge * w)
  assert np.mean((x @ w > 0) == (y > 0.5)) > 0.5  # it fits its own training data at least a bit
  return w


def test_surface_features_do_not_reveal_the_verdict(world):
  """Lookup tables and logistic regression on surface features of the answer stay near chance."""
  train = [_surface_features(r) for r in world["train"]]
  heldout = [_surface_features(r) for r in world["heldout"]]
  y_train = np.array([r.label for r in world["train"]], float)
  y_heldout = np.array([r.label for r in world["heldout"]], float)
  assert abs(y_heldout.mean() - 0.5) < 0.01  # so majority voting is at chance
  for name in ("length", "last_digit", "first_digit", "digit_histogram"):
    votes = collections.defaultdict(list)
    for f, y in zip(train, y_train):
      votes[f[name].tobytes()].append(y)
    table = {k: np.mean(v) >= 0.5 for k, v in votes.items()}
    pred = np.array([table.get(f[name].tobytes(), True) for f in heldout])
    assert np.mean(pred == y_heldout) < 0.58, name

  x_train = np.stack([f["all"] for f in train])
  x_heldout = np.stack([f["all"] for f in heldout])
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  weights = _logistic_regression((x_train - mean) / std, y_train)
  pred = np.c_[np.ones(len(x_heldout)), (x_heldout - mean) / std] @ weights > 0
  assert np.mean(pred == y_heldout) < 0.58


def test_tokenizer_digits_round_trip_and_chat_template(world_dir):
  tok = Tokenizer.from_dir(world_dir["tokenizer"])
  assert tok.vocab_size <= 512
  assert tok.eos_id == tok.token_to_id("<|im_end|>")
  assert tok.pad_id == tok.token_to_id("<|endoftext|>") and tok.bos_id is None
  digit_ids = [tok.token_to_id(str(d)) for d in range(10)]
  assert all(tok.encode(str(d)) == [i] for d, i in enumerate(digit_ids))
  assert tok.encode("90517") == [digit_ids[int(d)] for d in "90517"]
  template = get_template("cft")
  prompt_lengths = set()
  for record in readers.load_records(world_dir["heldout"])[:50]:
    messages = template.messages(record, with_target=True)
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    ids, mask = render_cft(record, template, tok)
    assert tok.decode(ids) == text
    assert len(ids) <= 128
    prompt = render_prompt(record, template, tok)
    prompt_lengths.add(len(prompt))
    assert list(ids[:len(prompt)]) == list(prompt) and not mask[:len(prompt)].any()
    assert tok.decode(ids[mask == 1]) == f"Critique:\n{record.critique}<|im_end|>"
    number_ids = tok.encode(record.solution.split(" = ")[1])
    assert len(number_ids) == len(record.solution.split(" = ")[1])
  assert len(prompt_lengths) == 1  # the default world has one fixed layout
  with open(os.path.join(world_dir["tokenizer"], "tokenizer_config.json")) as f:
    assert "system" not in json.load(f)["chat_template"]


def test_make_world_rejects_impossible_sizes():
  with pytest.raises(ValueError, match="too many"):
    synthetic.make_world(num_train=10, num_heldout=2, digits=1)
  assert len(synthetic.make_world(num_train=8, num_heldout=1, digits=1)["train"]) == 8
  with pytest.raises(ValueError, match="digits"):
    synthetic.make_world(digits=0)


def test_fallible_teacher_only_forgets_the_leading_carry_and_keeps_labels_exact(world):
  slipping = synthetic.make_world(seed=3, num_train=3000, num_heldout=2000,
                                  teacher_leading_carry_slip=0.7)
  slipped = eligible = 0
  for exact, record in zip(world["train"], slipping["train"]):
    assert (record.question, record.solution, record.label) == (
        exact.question, exact.solution, exact.label)
    a, b, _ = _operands(record)
    if record.critique == exact.critique:
      continue
    columns, exact_columns = _COLUMN.findall(record.critique), _COLUMN.findall(exact.critique)
    assert columns[:2] == exact_columns[:2]  # only the leading (hundreds) column differs
    x, y, carry_in, total, said, flag = columns[2]
    assert (carry_in, exact_columns[2][2]) == ("0", "1")
    assert int(total) == int(x) + int(y) and flag == ("ok" if said == total[1] else "no")
    # wrong answers never err in the leading column, so the slip flips only right answers
    assert parse_verdict(record.critique, "cft") is False
    assert parse_verdict(exact.critique, "cft") is record.label
    slipped += 1
  for record in world["train"]:
    a, b, _ = _operands(record)
    eligible += synthetic._carry_in_columns(a, b)[2]  # pylint: disable=protected-access
  assert abs(slipped / eligible - 0.7) < 0.05
  with pytest.raises(ValueError, match="teacher_leading_carry_slip"):
    synthetic.make_world(teacher_leading_carry_slip=1.5)


def test_written_world_records_its_arguments(world_dir, tmp_path):
  params = synthetic.written_world_params(os.path.dirname(world_dir["train"]))
  assert params["seed"] == 1 and params["num_train"] == 400
  assert params["teacher_leading_carry_slip"] == 0.0
  assert synthetic.written_world_params(str(tmp_path)) is None


def test_solver_rows_are_the_worked_sums_of_the_same_problems_without_critiques(world_dir):
  """solver_{split}.jsonl: one row per problem of the split, question -> the correct worked answer
  (each column total redone here, the boxed sum = a + b); no candidate solution, label or critique."""
  for split in ("train", "heldout"):
    problems = list(readers.load_records(world_dir[split]))
    rows = list(readers.load_records(world_dir[f"solver_{split}"]))
    assert [r.question for r in rows] == [r.question for r in problems]
    for row in rows:
      a, b = map(int, _PROBLEM.fullmatch(row.question).groups())
      *columns, boxed = re.split(r", |\. ", row.solution)
      carry = 0
      for i, column in enumerate(columns):
        x, y = int(str(a)[::-1][i]), int(str(b)[::-1][i])
        assert column == f"{x}+{y}+{carry}={x + y + carry:02d}"
        carry = (x + y + carry) // 10
      assert boxed == "\\boxed{" + str(a + b) + "}" and row.reference_answer == str(a + b)
      assert row.critique is None and row.label is None
      assert "vs" not in row.solution and "Conclusion" not in row.solution


def _first_wrong_step(a: int, b: int, steps) -> int:
  """The first wrong step of a column-totals answer, checked by redoing the arithmetic here."""
  a_digits, b_digits = str(a)[::-1].ljust(len(steps) - 1, "0"), str(b)[::-1].ljust(len(steps) - 1, "0")
  carry = 0
  for i, step in enumerate(steps[:-1]):
    assert re.fullmatch(r"\d\d", step), step
    if int(step) != int(a_digits[i]) + int(b_digits[i]) + carry:
      return i
    carry = int(step) // 10
  return -1 if steps[-1] == "\\boxed{" + str(a + b) + "}" else len(steps) - 1


def test_step_rows_label_the_first_wrong_step_and_the_exact_teacher_names_it(world):
  rows = synthetic.step_rows(world["train"], seed=3, teacher_leading_carry_slip=0.0)
  kinds = collections.Counter()
  for record, row in zip(world["train"], rows):
    a, b, _ = _operands(record)
    assert row.question == record.question and row.task == "step"
    assert row.error_step == _first_wrong_step(a, b, row.steps), row
    assert parse_first_wrong_step(row.critique, "deepcritic") == row.error_step
    assert row.label == (row.error_step == -1)
    kinds[row.error_step] += 1
  assert abs(kinds[-1] / len(rows) - 0.5) < 0.01
  assert all(kinds[k] > 0.05 * len(rows) for k in range(4)), kinds  # 3 columns and the boxed sum


def test_step_slip_rate_makes_every_step_slip_independently(world):
  """With a slip rate the first wrong step is still labelled exactly and named by the exact teacher,
  and about that share of the steps a critique checks are wrong, so copying a step is often wrong."""
  rows = synthetic.step_rows(world["train"], seed=3, teacher_leading_carry_slip=0.0, slip_rate=0.4)
  checked = wrong = 0
  for record, row in zip(world["train"], rows):
    a, b, _ = _operands(record)
    assert row.error_step == _first_wrong_step(a, b, row.steps), row
    assert parse_first_wrong_step(row.critique, "deepcritic") == row.error_step
    checked += row.error_step + 1 if row.error_step >= 0 else len(row.steps)
    wrong += row.error_step >= 0
  assert abs(wrong / checked - 0.4) < 0.03
  assert abs(sum(r.error_step == -1 for r in rows) / len(rows) - 0.6 ** 4) < 0.03
  with pytest.raises(ValueError, match="data.world.step_slip_rate"):
    synthetic.step_rows(world["train"][:2], seed=3, teacher_leading_carry_slip=0.0, slip_rate=1.0)
  with pytest.raises(ValueError, match="receives no carry"):
    synthetic.step_solution(111, 222, [("dropped_carry", 1, 0)])


def test_step_teacher_slips_only_at_the_leading_carry(world):
  exact = synthetic.step_rows(world["heldout"], seed=3, teacher_leading_carry_slip=0.0)
  slipping = synthetic.step_rows(world["heldout"], seed=3, teacher_leading_carry_slip=0.7)
  slipped = eligible = 0
  for record, good, bad in zip(world["heldout"], exact, slipping):
    assert (good.steps, good.error_step) == (bad.steps, bad.error_step)
    a, b, _ = _operands(record)
    leading_carry = synthetic.has_leading_carry(a, b)
    eligible += leading_carry and good.error_step in (-1, 2, 3)  # the check reaches the leading column
    if good.critique != bad.critique:
      assert leading_carry
      assert "+0=" in bad.critique.splitlines()[2] and "+1=" in good.critique.splitlines()[2]
      slipped += 1
  assert abs(slipped / eligible - 0.7) < 0.05


def test_step_world_files_load_as_step_records(tmp_path):
  paths = synthetic.write_world(str(tmp_path / "w"), seed=1, num_train=60, num_heldout=20, digits=2,
                                step_solutions=True)
  sft = readers.load_records(paths["step_heldout"])
  bench = readers.load_records(paths["step_heldout_processbench"], "processbench")
  rl = readers.load_records(paths["rl_step_train"])
  assert [(r.steps, r.error_step) for r in sft] == [(r.steps, r.error_step) for r in bench]
  assert all(r.critique is None and r.error_step is not None for r in rl) and len(rl) == 60
  assert synthetic.written_world_params(str(tmp_path / "w"))["step_solutions"] is True
  slipped = synthetic.write_world(str(tmp_path / "slipped"), seed=1, num_train=60, num_heldout=20,
                                  digits=2, step_solutions=True, step_slip_rate=0.4)
  with open(paths["step_heldout"], "rb") as f1, open(slipped["step_heldout"], "rb") as f2:
    assert f1.read() == f2.read()  # the slip rate changes the training split only
  plain = synthetic.write_world(str(tmp_path / "plain"), seed=1, num_train=60, num_heldout=20, digits=2)
  assert not any(name.startswith(("step_", "rl_step_")) for name in plain)
  with open(paths["train"], "rb") as f1, open(plain["train"], "rb") as f2:
    assert f1.read() == f2.read()  # the step rows draw from their own seeds
