"""Evaluation metrics: pass@k, majority voting, verdict classification metrics, ProcessBench F1.
All rates are fractions in [0, 1] (multiply by 100 for the papers' percentages)."""

from __future__ import annotations

import collections
from typing import Hashable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

  Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which stays finite for large n.
  """
  if not (n >= 1 and 0 <= c <= n and 1 <= k <= n):
    raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  prob_all_wrong = 1.0
  for i in range(n - c + 1, n + 1):
    prob_all_wrong *= 1.0 - k / i
  return 1.0 - prob_all_wrong


def majority_vote(answers: Sequence[Hashable | None]) -> Hashable | None:
  """The most frequent answer; None answers (no answer given) do not vote; ties go to the answer
  seen first (the order of Python's Counter.most_common, which ProcessBench's voting uses); None
  when no sample answered."""
  votes = collections.Counter(a for a in answers if a is not None)
  if not votes:
    return None
  return max(votes, key=votes.__getitem__)   # first-seen among equals: Counter keeps order


def maj_at_k(answers: Sequence[Hashable | None], correct_flags: Sequence[bool]) -> float:
  """1.0 when the most frequent answer among the k samples is correct, else 0.0.

  answers[i] is sample i's (normalised) final answer, None when it gave none (not a vote);
  correct_flags[i] says whether answers[i] is correct. Ties go to the answer seen first. Answers
  are compared by equality, so normalise equivalent forms (e.g. "0.5" and "1/2") beforehand.
  """
  if len(answers) != len(correct_flags):
    raise ValueError(f"maj_at_k: {len(answers)} answers but {len(correct_flags)} correct_flags")
  winner = majority_vote(answers)
  return 0.0 if winner is None else float(correct_flags[answers.index(winner)])


def _f1(true_positive: int, predicted: int, actual: int) -> float:
  """F1 from counts; 0.0 when precision or recall is undefined."""
  if true_positive == 0:
    return 0.0
  precision, recall = true_positive / predicted, true_positive / actual
  return 2 * precision * recall / (precision + recall)


def verdict_metrics(preds: Sequence[bool | None], labels: Sequence[bool]) -> dict[str, float]:
  """Critic verdict quality against correctness labels (True = the solution is right).

  A missing verdict (None) counts as an error for both classes. Returns accuracy, balanced
  accuracy (mean recall over the classes present), F1 with "right" and with "wrong" as the
  positive class, their mean (macro F1), the missing rate and the count.
  """
  if len(preds) != len(labels):
    raise ValueError(f"verdict_metrics: {len(preds)} preds but {len(labels)} labels")
  if not labels:
    raise ValueError("verdict_metrics: no examples")
  labels = [bool(label) for label in labels]
  preds = [None if pred is None else bool(pred) for pred in preds]
  metrics: dict[str, float] = {"num_examples": float(len(labels))}
  recalls = []
  for name, positive in (("right", True), ("wrong", False)):
    actual = sum(label is positive for label in labels)
    predicted = sum(pred is positive for pred in preds)
    true_positive = sum(p is positive and l is positive for p, l in zip(preds, labels))
    metrics[f"f1_{name}"] = _f1(true_positive, predicted, actual)
    if actual:
      recalls.append(true_positive / actual)
  metrics["accuracy"] = sum(p is l for p, l in zip(preds, labels)) / len(labels)
  metrics["balanced_accuracy"] = sum(recalls) / len(recalls)
  metrics["macro_f1"] = (metrics["f1_right"] + metrics["f1_wrong"]) / 2
  metrics["missing_rate"] = sum(p is None for p in preds) / len(preds)
  return metrics


def processbench_f1(pred_steps: Sequence[int | None], labels: Sequence[int]) -> dict[str, float]:
  """ProcessBench: accuracy on erroneous samples (pred == earliest wrong step), accuracy on correct
  samples (label -1, pred == -1) and F1 = their harmonic mean. A None prediction is wrong.
  """
  if len(pred_steps) != len(labels):
    raise ValueError(f"processbench_f1: {len(pred_steps)} predictions but {len(labels)} labels")
  erroneous = [pred == label for pred, label in zip(pred_steps, labels) if label != -1]
  correct = [pred == -1 for pred, label in zip(pred_steps, labels) if label == -1]
  error_acc = sum(erroneous) / len(erroneous) if erroneous else 0.0
  correct_acc = sum(correct) / len(correct) if correct else 0.0
  f1 = 2 * error_acc * correct_acc / (error_acc + correct_acc) if error_acc + correct_acc else 0.0
  return {"error_acc": error_acc, "correct_acc": correct_acc, "f1": f1,
          "num_erroneous": float(len(erroneous)), "num_correct": float(len(correct))}
