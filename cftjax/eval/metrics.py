"""Evaluation metrics: pass@k, majority voting, verdict classification metrics, ProcessBench F1.
All rates are fractions in [0, 1] (multiply by 100 for the papers' percentages)."""

from __future__ import annotations

import collections
import re
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


_SPACES = re.compile(r"\s+")
_ANSWER_NOISE = (r"\left", r"\right", r"\!", r"\,", "$", r"\displaystyle")


def vote_key(answer: str | None) -> str | None:
  """A boxed answer normalised for majority voting (spacing and typesetting noise removed)."""
  if answer is None:
    return None
  key = _SPACES.sub("", answer)
  for noise in _ANSWER_NOISE:
    key = key.replace(noise, "")
  return key.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac").rstrip(".")


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


PICK_RULES = ("first", "majority")


def _majority_index(answers: Sequence[Hashable | None], among: Sequence[int]) -> int | None:
  """The first index in `among` holding the most frequent non-None answer there (ties: seen first)."""
  winner = majority_vote([answers[i] for i in among])
  return None if winner is None else next(i for i in among if answers[i] == winner)


def pick_sample(verdicts: Sequence[bool | None], answers: Sequence[Hashable | None], rule: str) -> int:
  """The sample a critic picks among an actor's samples.

  rule "first": the first sample judged right; "majority": the first sample holding the most frequent
  answer among those judged right. When no sample is judged right (a missing verdict is not "right"),
  both fall back to the majority vote over all samples, and to sample 0 when no sample has an answer.
  """
  if rule not in PICK_RULES:
    raise ValueError(f"pick rule {rule!r}; choose one of {PICK_RULES}")
  if len(verdicts) != len(answers) or not answers:
    raise ValueError(f"pick_sample: {len(verdicts)} verdicts and {len(answers)} answers; they must match "
                     "and be non-empty")
  judged_right = [i for i, v in enumerate(verdicts) if v is True]
  if judged_right:
    if rule == "first":
      return judged_right[0]
    chosen = _majority_index(answers, judged_right)
    if chosen is not None:
      return chosen
  chosen = _majority_index(answers, range(len(answers)))
  return 0 if chosen is None else chosen


def rerank_metrics(correct: Sequence[Sequence[bool]], verdicts: Sequence[Sequence[bool | None]],
                   answers: Sequence[Sequence[Hashable | None]], rule: str) -> dict[str, float]:
  """A critic reranking an actor's samples, over problems (correct[p][i]: sample i of problem p is right).

  pass@1: accuracy of the picked sample (`pick_sample`); actor_pass@1: the mean per-problem fraction of
  right samples; majority: accuracy of the majority vote over all samples; gain_over_majority and
  gain_over_actor: pass@1 minus those; oracle: fraction of problems with a right sample; the critic's
  precision (right samples among those judged right; 0 when none is) and recall (samples judged right
  among the right ones; 0 when none is right) over every sample; none_judged_right_rate: problems where
  the critic judged no sample right.
  """
  if not (len(correct) == len(verdicts) == len(answers)) or not correct:
    raise ValueError(f"rerank_metrics: {len(correct)} correct, {len(verdicts)} verdicts, {len(answers)} "
                     "answers lists; they must match and be non-empty")
  picked, actor, majority, oracle, none_right = [], [], [], [], []
  true_positive = judged_right = actually_right = 0
  for flags, judged, keys in zip(correct, verdicts, answers):
    if not (len(flags) == len(judged) == len(keys)):
      raise ValueError("rerank_metrics: a problem's correct, verdicts and answers differ in length")
    picked.append(float(flags[pick_sample(judged, keys, rule)]))
    actor.append(sum(flags) / len(flags))
    majority.append(maj_at_k(list(keys), list(flags)))
    oracle.append(float(any(flags)))
    none_right.append(float(not any(v is True for v in judged)))
    true_positive += sum(bool(f) and v is True for f, v in zip(flags, judged))
    judged_right += sum(v is True for v in judged)
    actually_right += sum(bool(f) for f in flags)
  mean = lambda xs: sum(xs) / len(xs)
  out = {"pass@1": mean(picked), "actor_pass@1": mean(actor), "majority": mean(majority),
         "oracle": mean(oracle), "critic_precision": true_positive / judged_right if judged_right else 0.0,
         "critic_recall": true_positive / actually_right if actually_right else 0.0,
         "none_judged_right_rate": mean(none_right)}
  out["gain_over_majority"] = out["pass@1"] - out["majority"]
  out["gain_over_actor"] = out["pass@1"] - out["actor_pass@1"]
  return out


def refine_metrics(correct_by_round: Sequence[Sequence[bool]]) -> dict[str, float]:
  """Critique-and-refine accuracy: correct_by_round[p][r] says whether problem p's answer after r
  refinement rounds is right (round 0: the actor's first answer).

  Returns accuracy_round_<r> for every round, gain (last round minus round 0), and the fractions of
  problems that went wrong -> right and right -> wrong between round 0 and the last round.
  """
  if not correct_by_round or len({len(rounds) for rounds in correct_by_round}) != 1:
    raise ValueError("refine_metrics: needs problems with the same number (>= 1) of rounds each")
  n, rounds = len(correct_by_round), len(correct_by_round[0])
  if rounds < 1:
    raise ValueError("refine_metrics: needs at least round 0")
  out = {f"accuracy_round_{r}": sum(bool(p[r]) for p in correct_by_round) / n for r in range(rounds)}
  out["gain"] = out[f"accuracy_round_{rounds - 1}"] - out["accuracy_round_0"]
  out["wrong_to_right"] = sum(not p[0] and bool(p[-1]) for p in correct_by_round) / n
  out["right_to_wrong"] = sum(bool(p[0]) and not p[-1] for p in correct_by_round) / n
  return out
