"""Tests for cftjax.eval.metrics: pass@k against subset enumeration, maj@k, verdict and ProcessBench metrics."""

from __future__ import annotations

import itertools
import math

import pytest

from cftjax.eval.metrics import maj_at_k, majority_vote, pass_at_k, processbench_f1, verdict_metrics


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_equals_subset_enumeration(n):
  for c in range(n + 1):
    samples = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
      subsets = list(itertools.combinations(samples, k))
      brute_force = sum(any(s) for s in subsets) / len(subsets)
      assert pass_at_k(n, c, k) == pytest.approx(brute_force, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(100, 7, 10), (200, 1, 1), (1000, 3, 50), (64, 0, 8), (64, 64, 1)])
def test_pass_at_k_equals_closed_form(n, c, k):
  closed_form = 1 - math.comb(n - c, k) / math.comb(n, k)
  assert pass_at_k(n, c, k) == pytest.approx(closed_form, rel=1e-12, abs=1e-15)
  assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_large_n_is_finite():
  # C(5000, 2500) overflows float; the product form does not.
  assert 0.0 < pass_at_k(5000, 2, 2500) < 1.0
  assert pass_at_k(5000, 2, 2500) == pytest.approx(1 - (2500 / 5000) * (2499 / 4999))


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
  with pytest.raises(ValueError, match="pass_at_k"):
    pass_at_k(n, c, k)


def test_maj_at_k():
  assert maj_at_k(["1", "2", "2", None], [True, False, False, False]) == 0.0
  assert maj_at_k(["1", "2", "1", None, None, None], [True, False, True, False, False, False]) == 1.0
  assert maj_at_k(["3", "4"], [True, False]) == 1.0   # tie: first seen wins
  assert maj_at_k(["4", "3"], [False, True]) == 0.0
  assert maj_at_k([None, None], [False, False]) == 0.0
  with pytest.raises(ValueError, match="2 answers but 1"):
    maj_at_k(["1", "2"], [True])


def test_verdict_metrics_hand_computed():
  labels = [True, True, True, True, False, False, False, False, False, False]
  preds = [True, True, True, None, False, False, True, True, None, False]
  metrics = verdict_metrics(preds, labels)
  # right: TP 3, predicted 5, actual 4 -> P 0.6, R 0.75; wrong: TP 3, predicted 3, actual 6 -> P 1, R 0.5.
  assert metrics["accuracy"] == pytest.approx(6 / 10)
  assert metrics["balanced_accuracy"] == pytest.approx((0.75 + 0.5) / 2)
  assert metrics["f1_right"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
  assert metrics["f1_wrong"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
  assert metrics["macro_f1"] == pytest.approx((metrics["f1_right"] + metrics["f1_wrong"]) / 2)
  assert metrics["missing_rate"] == pytest.approx(0.2)
  assert metrics["num_examples"] == 10


def test_verdict_metrics_degenerate_cases():
  always_right = verdict_metrics([True] * 4, [True, True, False, False])
  assert always_right["balanced_accuracy"] == 0.5
  assert always_right["f1_wrong"] == 0.0
  one_class = verdict_metrics([True, False], [True, True])
  assert one_class["balanced_accuracy"] == 0.5   # recall over the classes present only
  with pytest.raises(ValueError, match="2 preds but 1 labels"):
    verdict_metrics([True, False], [True])


def test_processbench_f1_hand_made():
  labels = [-1, -1, -1, -1, 2, 0, 5, 3]
  preds = [-1, -1, 2, None, 2, 1, 5, -1]
  metrics = processbench_f1(preds, labels)
  assert metrics["correct_acc"] == pytest.approx(2 / 4)
  assert metrics["error_acc"] == pytest.approx(2 / 4)
  assert metrics["f1"] == pytest.approx(0.5)
  assert (metrics["num_erroneous"], metrics["num_correct"]) == (4, 4)
  lopsided = processbench_f1([-1, -1, -1], [-1, -1, 4])
  assert lopsided["correct_acc"] == 1.0 and lopsided["error_acc"] == 0.0 and lopsided["f1"] == 0.0
  mixed = processbench_f1([-1, 0, 1, 1], [-1, 0, 1, 2])
  assert mixed["f1"] == pytest.approx(2 * 1.0 * (2 / 3) / (1.0 + 2 / 3))


def test_majority_vote_ties_and_abstentions():
  assert majority_vote([3, 2, 2, 3, 1]) == 3       # 3 and 2 tie: the first seen wins
  assert majority_vote([2, 3, 3, 2]) == 2
  assert majority_vote([None, None, 4]) == 4       # no answer is no vote
  assert majority_vote([None, None]) is None and majority_vote([]) is None
  assert majority_vote([-1, 0, 0]) == 0
