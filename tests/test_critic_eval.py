"""The critic eval kinds: pick rule, reranking and refinement metrics on hand-made samples; and
`critic_rerank` / `critique_refine` end to end with checkpoints whose greedy answers are known (an
actor that always answers \\boxed{5}, critics that always conclude right or wrong), scored against
expectations computed by hand, with resume."""

from __future__ import annotations

import json
import os

import pytest

from cftjax.data import critique
from cftjax.data.critique import CritiqueRecord
from cftjax.eval import metrics, runner, suites
from cftjax.tokenizer import Tokenizer
from tests.chain_models import save_chain_model

# ------------------------------------------------------------------------------------------------
# Metrics on hand-made samples.


def test_pick_rules():
  # judged right: 0 ("2"), 1 ("8"), 2 ("8"): first -> 0; majority among judged right -> "8" -> 1.
  verdicts, answers = [True, True, True, None], ["2", "8", "8", "2"]
  assert metrics.pick_sample(verdicts, answers, "first") == 0
  assert metrics.pick_sample(verdicts, answers, "majority") == 1
  # none judged right (False / missing): the majority over all ("3", first of the 2-2 tie) at index 1.
  assert metrics.pick_sample([False, None, False, None, False], [None, "3", "4", "4", "3"], "first") == 1
  assert metrics.pick_sample([False, None], [None, None], "majority") == 0
  # judged right but without answers: majority over all.
  assert metrics.pick_sample([True, False, False], [None, "7", "7"], "majority") == 1
  with pytest.raises(ValueError, match="pick rule 'best'"):
    metrics.pick_sample([True], ["1"], "best")


def test_rerank_metrics_by_hand():
  correct = [[False, True, True], [False, False, True], [False, True, True, False]]
  verdicts = [[True, True, None], [False, None, True], [True, True, True, None]]
  answers = [["5", "7", "7"], ["3", "3", "9"], ["2", "8", "8", "2"]]
  first = metrics.rerank_metrics(correct, verdicts, answers, "first")
  # picks: 0 (wrong), 2 (right), 0 (wrong); majority: "7" right, "3" wrong, "2" (tie, first) wrong.
  assert first["pass@1"] == pytest.approx(1 / 3)
  assert first["majority"] == pytest.approx(1 / 3)
  assert first["gain_over_majority"] == pytest.approx(0.0)
  assert first["actor_pass@1"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 4) / 3)
  assert first["oracle"] == 1.0 and first["none_judged_right_rate"] == 0.0
  # judged right: 2 + 1 + 3 = 6 samples, of which right: 1 + 1 + 2 = 4; right samples: 2 + 1 + 2 = 5.
  assert first["critic_precision"] == pytest.approx(4 / 6)
  assert first["critic_recall"] == pytest.approx(4 / 5)
  majority = metrics.rerank_metrics(correct, verdicts, answers, "majority")
  # picks: "5" vs "7" tie among judged right -> 0 (wrong); 2 (right); "8" -> 1 (right).
  assert majority["pass@1"] == pytest.approx(2 / 3)
  assert majority["gain_over_majority"] == pytest.approx(1 / 3)


def test_refine_metrics_by_hand():
  out = metrics.refine_metrics([[False, True, True], [True, True, False], [True, False, True],
                                [False, False, False]])
  assert out["accuracy_round_0"] == 0.5 and out["accuracy_round_1"] == 0.5
  assert out["accuracy_round_2"] == 0.5 and out["gain"] == 0.0
  assert out["wrong_to_right"] == 0.25 and out["right_to_wrong"] == 0.25
  with pytest.raises(ValueError, match="same number"):
    metrics.refine_metrics([[True], [True, False]])


def test_bad_critic_benchmark_entries_name_the_key(tmp_path):
  entry = suites.benchmark_entry("x.jsonl", "critique_refine", n_samples=2, temperature=1.0).to_dict()
  with pytest.raises(ValueError, match=r"cfg\.n_samples=2; critique_refine refines one answer"):
    suites.Benchmark.from_config("r", entry, "cfg")
  entry = suites.benchmark_entry("x.jsonl", "critic_rerank", pick="best").to_dict()
  with pytest.raises(ValueError, match=r"cfg\.pick='best'"):
    suites.Benchmark.from_config("r", entry, "cfg")
  entry = suites.benchmark_entry("x.jsonl", "critic_rerank", actor_template="nope").to_dict()
  with pytest.raises(ValueError, match=r"cfg\.actor_template: unknown template 'nope'"):
    suites.Benchmark.from_config("r", entry, "cfg")


# ------------------------------------------------------------------------------------------------
# End to end with models whose answers are known.

# Two of the three problems have the answer 5, which the actor always gives.
PROBLEMS = [{"question": "What is 2 + 3?", "answer": "5"}, {"question": "What is 1 + 1?", "answer": "2"},
            {"question": "What is 4 + 1?", "answer": "5"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  from cftjax.data import synthetic
  root = tmp_path_factory.mktemp("critic_eval")
  world = synthetic.write_world(str(root / "world"), num_train=20, num_heldout=4)
  tokenizer = Tokenizer.from_dir(world["tokenizer"])
  prompt_end = list(critique.render_prompt(CritiqueRecord(question="q"), "math_cot", tokenizer))
  paths = {name: str(root / name) for name in ("actor", "critic_right", "critic_wrong")}
  save_chain_model(paths["actor"], world["tokenizer"], prompt_end, "So \\boxed{5}")
  save_chain_model(paths["critic_right"], world["tokenizer"], prompt_end, "Conclusion: right [END]")
  save_chain_model(paths["critic_wrong"], world["tokenizer"], prompt_end, "Conclusion: wrong [END]")
  problems = str(root / "problems.jsonl")
  with open(problems, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(p) + "\n" for p in PROBLEMS)
  return paths, problems


def _suite(out_dir: str, **benchmarks):
  c = suites.base_suite_config("critics")
  c.output_dir, c.batch_size, c.progress_bar, c.grader_workers = out_dir, 2, False, 1
  c.prompt_buckets = (256,)  # one prompt shape: each generate program compiles once
  for name, entry in benchmarks.items():
    c.benchmarks[name] = entry
  return c


def _records(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_critic_rerank_end_to_end(models, tmp_path):
  paths, problems = models
  entry = suites.benchmark_entry(problems, "critic_rerank", actor=paths["actor"], n_samples=2,
                                 temperature=1.0, max_new_tokens=12, critic_max_new_tokens=12)
  out_dir = str(tmp_path / "right")
  summary = runner.run_eval(_suite(out_dir, rerank=entry), paths["critic_right"])["benchmarks"]["rerank"]
  # Every sample is "So \boxed{5}" and judged right: picks are sample 0, right on 2 of 3 problems.
  assert summary["pass@1"] == pytest.approx(2 / 3) and summary["actor_pass@1"] == pytest.approx(2 / 3)
  assert summary["majority"] == pytest.approx(2 / 3) and summary["gain_over_majority"] == 0.0
  assert summary["critic_precision"] == pytest.approx(4 / 6) and summary["critic_recall"] == 1.0
  assert summary["critic_missing_rate"] == 0.0 and summary["num_samples"] == 6
  records = _records(os.path.join(out_dir, "rerank.jsonl"))
  assert [[s["completion"] for s in r["samples"]] for r in records] == [["So \\boxed{5}"] * 2] * 3
  assert all(s["critique"] == "Conclusion: right [END]" and s["verdict"] is True
             for r in records for s in r["samples"])
  assert [r["pick"] for r in records] == [0, 0, 0]

  # A critic that rejects everything: nothing judged right, so the pick falls back to the majority.
  wrong = runner.run_eval(_suite(str(tmp_path / "wrong"), rerank=entry), paths["critic_wrong"])
  wrong = wrong["benchmarks"]["rerank"]
  assert wrong["pass@1"] == pytest.approx(2 / 3) and wrong["none_judged_right_rate"] == 1.0
  assert wrong["critic_precision"] == 0.0 and wrong["critic_recall"] == 0.0


def test_critic_rerank_resumes_from_written_records(models, tmp_path):
  paths, problems = models
  entry = suites.benchmark_entry(problems, "critic_rerank", actor=paths["actor"], n_samples=2,
                                 temperature=1.0, max_new_tokens=12, critic_max_new_tokens=12, limit=2)
  out_dir = str(tmp_path / "out")
  runner.run_eval(_suite(out_dir, rerank=entry), paths["critic_right"])
  path = os.path.join(out_dir, "rerank.jsonl")
  first = _records(path)
  # Hand-edit example 1's written record: the critic now judged sample 1 right only, and it is right.
  first[1]["samples"][0].update(verdict=False, correct=False)
  first[1]["samples"][1].update(verdict=True, correct=True, prediction="2")
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in first)
  entry.limit = 3
  summary = runner.run_eval(_suite(out_dir, rerank=entry), paths["critic_right"])["benchmarks"]["rerank"]
  records = _records(path)
  assert records[:2] == first and len(records) == 3   # example 2 generated, 0 and 1 kept
  # picks: 0 (right), 1 (right, edited), 0 (right); majority: "5" right, "5" vs "2" tie -> "5" wrong, right.
  assert summary["pass@1"] == 1.0 and summary["majority"] == pytest.approx(2 / 3)
  assert summary["gain_over_majority"] == pytest.approx(1 / 3)


def test_critique_refine_end_to_end(models, tmp_path):
  paths, problems = models
  entry = suites.benchmark_entry(problems, "critique_refine", actor=paths["actor"], rounds=2,
                                 max_new_tokens=12, critic_max_new_tokens=12)
  out_dir = str(tmp_path / "refine")
  summary = runner.run_eval(_suite(out_dir, refine=entry), paths["critic_wrong"])["benchmarks"]["refine"]
  # The critic calls every answer wrong, so each round the actor refines; it answers 5 again.
  assert [summary[f"accuracy_round_{r}"] for r in range(3)] == pytest.approx([2 / 3] * 3)
  assert summary["refined_rate_round_1"] == 1.0 and summary["refined_rate_round_2"] == 1.0
  assert summary["gain"] == 0.0 and summary["wrong_to_right"] == 0.0
  records = _records(os.path.join(out_dir, "refine.jsonl"))
  assert [len(r["samples"]) for r in records] == [3, 3, 3]
  for r in records:
    assert [s["refined"] for s in r["samples"]] == [False, True, True]
    assert [s.get("verdict") for s in r["samples"]] == [False, False, None]
    assert r["samples"][0]["critique"] == "Conclusion: wrong [END]"
  # A critic that accepts every answer: nothing is refined.
  kept = runner.run_eval(_suite(str(tmp_path / "kept"), refine=entry), paths["critic_right"])
  kept = kept["benchmarks"]["refine"]
  assert kept["refined_rate_round_1"] == 0.0 and kept["accuracy_round_2"] == pytest.approx(2 / 3)
  table = runner.format_table({"benchmarks": {"refine": kept}})
  assert "accuracy_round_0  66.7" in table and "gain   0.0" in table
