"""End-to-end tests of the benchmark runner on a tiny untrained model saved as a checkpoint: outputs,
resume (skip done examples, drop a torn line), metrics recomputed by hand from the written records,
published math row shapes, the periodic hook, the CLI function and run-directory loading."""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import pathlib
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from cftjax.data import critique, synthetic
from cftjax.eval import runner, suites
from cftjax.rewards.grading import MathGrader
from cftjax.models import ModelConfig, abstract_params
from cftjax.models.checkpoint_io import save_model_checkpoint
from cftjax.tokenizer import Tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Shared by every test so the generate programs compile once (greedy) and once (sampled).
BATCH, NEW_TOKENS, BUCKETS = 4, 8, (512,)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return synthetic.write_world(str(tmp_path_factory.mktemp("world")), num_train=200, num_heldout=24)


@pytest.fixture(scope="module")
def model(world, tmp_path_factory):
  """(ckpt_dir, cfg, params, tokenizer) of a tiny untrained decoder with the world's tokenizer.

  Params are drawn in numpy with `init_params`'s shapes (compiling the Flax init costs more than
  every eval here).
  """
  tokenizer = Tokenizer.from_dir(world["tokenizer"])
  cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: (np.ones(a.shape, a.dtype) if "scale" in jax.tree_util.keystr(path)
                       else rng.normal(0.0, 0.5, a.shape).astype(a.dtype)),
      nn.unbox(abstract_params(cfg)))
  ckpt_dir = str(tmp_path_factory.mktemp("ckpt"))
  save_model_checkpoint(ckpt_dir, cfg, params, world["tokenizer"])
  return ckpt_dir, cfg, params, tokenizer


def suite_config(out_dir: str, **benchmarks):
  c = suites.base_suite_config("test")
  c.output_dir = out_dir
  c.batch_size = BATCH
  c.prompt_buckets = BUCKETS
  c.progress_bar = False
  c.grader_workers = 1
  for name, entry in benchmarks.items():
    c.benchmarks[name] = entry
  return c


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def write_records(path: str, records: list[dict], torn_tail: str = "") -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
    f.write(torn_tail)


def sample(completion: str, prediction, correct: bool) -> dict:
  return {"completion": completion, "prediction": prediction, "correct": correct, "num_tokens": 5,
          "truncated": False}


# ------------------------------------------------------------------------------------------------
# Critique verdicts.


def test_critique_end_to_end_resume_and_metrics(world, model, tmp_path):
  ckpt_dir = model[0]
  out_dir = str(tmp_path / "out")
  entry = suites.benchmark_entry(world["heldout"], "critique", verdict_style="cft",
                                 max_new_tokens=NEW_TOKENS, limit=6)
  config = suite_config(out_dir, heldout=entry)
  examples = suites.load_examples(suites.Benchmark.from_config("heldout", entry.to_dict(), "test"))
  # Examples 0 and 1 were done by an earlier run; example 2's record was cut short by a crash.
  done = [{"index": i, "id": examples[i].id, "prompt": "p", "target": examples[i].target,
           "samples": [sample(f"Conclusion: {text} [END]", verdict, verdict == examples[i].target)]}
          for i, (text, verdict) in enumerate((("right", True), ("wrong", False)))]
  jsonl = os.path.join(out_dir, "heldout.jsonl")
  write_records(jsonl, done, torn_tail='{"index": 2, "id": "heldo')

  summary = runner.run_eval(config, ckpt_dir)

  records = read_jsonl(jsonl)
  assert sorted(r["index"] for r in records) == list(range(6))
  assert records[:2] == done  # skipped, untouched
  generated = [r for r in records if r["index"] >= 2]
  metrics = summary["benchmarks"]["heldout"]
  assert metrics["generated_tokens"] == sum(r["samples"][0]["num_tokens"] for r in generated)
  for r in generated:
    s = r["samples"][0]
    assert r["id"] == examples[r["index"]].id and r["target"] == examples[r["index"]].target
    assert "Question:" in r["prompt"] and 1 <= s["num_tokens"] <= NEW_TOKENS
    assert s["prediction"] == critique.parse_verdict(s["completion"], "cft")
    assert s["correct"] == (s["prediction"] is not None and s["prediction"] == r["target"])

  # Metrics by hand from the written records: F1 = 2 TP / (predicted + actual).
  preds = [r["samples"][0]["prediction"] for r in records]
  labels = [r["target"] for r in records]
  expected = {"accuracy": np.mean([p is not None and p == l for p, l in zip(preds, labels)]),
              "missing_rate": np.mean([p is None for p in preds])}
  recalls = []
  for name, positive in (("right", True), ("wrong", False)):
    tp = sum(p is positive and l is positive for p, l in zip(preds, labels))
    predicted, actual = preds.count(positive), labels.count(positive)
    expected[f"f1_{name}"] = 2 * tp / (predicted + actual) if tp else 0.0
    if actual:
      recalls.append(tp / actual)
  expected["balanced_accuracy"] = np.mean(recalls)
  for key, value in expected.items():
    assert metrics[key] == pytest.approx(value), key
  assert metrics["num_examples"] == 6 and set(metrics["by_style"]) == set(critique.STYLES)
  assert metrics["by_style"]["cft"]["accuracy"] == pytest.approx(expected["accuracy"])
  with open(os.path.join(out_dir, runner.SUMMARY_FILE)) as f:
    assert json.load(f) == json.loads(json.dumps(summary))

  # A re-run generates nothing and rewrites nothing.
  before = open(jsonl, "rb").read()
  again = runner.run_eval(config, ckpt_dir)
  assert again["benchmarks"]["heldout"]["generated_tokens"] == 0
  assert open(jsonl, "rb").read() == before
  assert again["benchmarks"]["heldout"]["accuracy"] == metrics["accuracy"]

  # Other generation settings in the same output dir are refused, naming what changed.
  config.benchmarks.heldout.max_new_tokens = NEW_TOKENS + 1
  with pytest.raises(ValueError, match="max_new_tokens"):
    runner.run_eval(config, ckpt_dir)


# ------------------------------------------------------------------------------------------------
# Math: sampling, pass@k, maj@k, grading.


def test_math_sampled_end_to_end_pass_and_maj_at_k(world, model, tmp_path):
  ckpt_dir = model[0]
  out_dir = str(tmp_path / "out")
  entry = suites.benchmark_entry(world["rl_math_heldout"], "math", n_samples=3, temperature=1.0,
                                 ks=(1, 2, 3), max_new_tokens=NEW_TOKENS, limit=3)
  config = suite_config(out_dir, addition=entry)
  examples = suites.load_examples(suites.Benchmark.from_config("addition", entry.to_dict(), "test"))
  gold = examples[0].target
  done = [{"index": 0, "id": examples[0].id, "prompt": "p", "target": gold,
           "samples": [sample("\\boxed{5}", "5", False), sample(f"\\boxed{{{gold}}}", gold, True),
                       sample(f"so \\boxed{{ {gold} }}", f" {gold} ", True)]}]
  write_records(os.path.join(out_dir, "addition.jsonl"), done)

  summary = runner.run_eval(config, ckpt_dir)

  records = read_jsonl(os.path.join(out_dir, "addition.jsonl"))
  assert [r["index"] for r in records] == [0, 1, 2] and records[0] == done[0]
  assert all(len(r["samples"]) == 3 for r in records)
  a, b = re.fullmatch(r"What is (\d+) \+ (\d+)\?", examples[1].record.question).groups()
  assert records[1]["target"] == str(int(a) + int(b))
  metrics = summary["benchmarks"]["addition"]
  for k in (1, 2, 3):
    by_hand = []
    for r in records:
      n, c = len(r["samples"]), sum(s["correct"] for s in r["samples"])
      by_hand.append(1 - math.comb(n - c, k) / math.comb(n, k))
    assert metrics[f"pass@{k}"] == pytest.approx(np.mean(by_hand)), k
  for k in (2, 3):
    by_hand = []
    for r in records:
      votes = [runner.vote_key(s["prediction"]) for s in r["samples"][:k]]
      counts = collections.Counter(v for v in votes if v is not None)
      if not counts:
        by_hand.append(0.0)
        continue
      winner = next(v for v in votes if counts.get(v) == max(counts.values()))
      by_hand.append(float(r["samples"][votes.index(winner)]["correct"]))
    assert metrics[f"maj@{k}"] == pytest.approx(np.mean(by_hand)), k
  # Record 0 alone: 2 of 3 correct; its first two samples tie 1-1 and the first seen ("5") wins.
  assert runner.summarize(runner.suite_benchmarks(config)[0], records[:1])["maj@2"] == 0.0
  assert metrics["num_samples"] == 9 and "maj@1" not in metrics


def test_math_grading_of_samples(world):
  bench = suites.Benchmark("m", world["rl_math_heldout"], "math")
  example = suites.Example("x", None, "579")
  texts = ["\\boxed{579}", "\\boxed{578}", "hence $\\boxed{\\frac{1158}{2}}$.", "579"]
  completions = [[runner.Completion(t, 3, False) for t in texts]]
  with MathGrader(num_workers=1, timeout_s=20) as grader:
    scored = runner.score_samples(bench, [example], completions, grader)[0]
  assert [s["correct"] for s in scored] == [True, False, True, False]
  assert [s["prediction"] for s in scored] == ["579", "578", "\\frac{1158}{2}", None]
  assert scored[3]["reason"] == "no boxed answer"


@pytest.mark.parametrize("row, answer", [
    ({"problem": "p", "solution": "s \\boxed{3}", "answer": "\\frac{1}{2}", "unique_id": "u"}, "\\frac{1}{2}"),
    ({"question": "q", "answer": "Natalia sold 48/2 = 24 clips.\n#### 1,072"}, "1072"),
    ({"problem": "p", "solution": "So the rate is $\\boxed{4.5 \\times 10^{3}}$ m/s."}, "4.5 \\times 10^{3}"),
    ({"question": "q", "final_answer": ["$x=\\frac{\\pi}{3}$"], "id": 7}, "x=\\frac{\\pi}{3}"),
    ({"problem": "p", "answer": 204, "id": 60}, "204"),
    ({"question": "q", "answer": 27.0}, "27"),
    ({"question": "q", "answer": 0.5}, "0.5"),
])
def test_math_answer_of_published_rows(row, answer):
  assert suites.math_answer(row, "f.jsonl line 1") == answer
  assert suites.math_example(row, "f.jsonl line 1").target == answer


def test_math_row_errors_name_the_row():
  with pytest.raises(ValueError, match="f.jsonl line 3: no gold answer"):
    suites.math_example({"problem": "p", "solution": "no box"}, "f.jsonl line 3")
  with pytest.raises(ValueError, match="f.jsonl line 4: no question"):
    suites.math_example({"answer": "1"}, "f.jsonl line 4")
  with pytest.raises(ValueError, match="ks"):
    suites.Benchmark.from_config("b", {"path": "x", "kind": "math", "ks": (4,)}, "config.benchmarks.b")


# ------------------------------------------------------------------------------------------------
# ProcessBench.


def test_processbench_end_to_end_f1(model, tmp_path):
  ckpt_dir = model[0]
  rows = [{"id": f"pb-{i}", "problem": f"What is {i} + 1?", "steps": [f"{i} + 1 = {i + 1 + bad}", "Done."],
           "final_answer_correct": label == -1, "label": label}
          for i, (bad, label) in enumerate(((0, -1), (1, 0), (0, 1), (0, -1)))]
  data = tmp_path / "processbench.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out_dir = str(tmp_path / "out")
  entry = suites.benchmark_entry(str(data), "processbench", max_new_tokens=NEW_TOKENS)
  config = suite_config(out_dir, pb=entry)
  done = [{"index": 0, "id": "pb-0", "prompt": "p", "target": -1, "samples": [sample("\\boxed{-1}", -1, True)]},
          {"index": 1, "id": "pb-1", "prompt": "p", "target": 0, "samples": [sample("\\boxed{0}", 0, True)]}]
  write_records(os.path.join(out_dir, "pb.jsonl"), done)

  metrics = runner.run_eval(config, ckpt_dir)["benchmarks"]["pb"]

  records = read_jsonl(os.path.join(out_dir, "pb.jsonl"))
  assert [r["target"] for r in records] == [-1, 0, 1, -1]
  assert "What is 2 + 1?" in records[2]["prompt"] and "Done." in records[2]["prompt"]
  example = suites.load_examples(suites.Benchmark.from_config("pb", config.benchmarks.pb.to_dict(), "pb"))[2]
  assert example.record.solution == ("<paragraph_0>\n2 + 1 = 3\n</paragraph_0>\n\n"
                                     "<paragraph_1>\nDone.\n</paragraph_1>")
  pairs = [(r["samples"][0]["prediction"], r["target"]) for r in records]
  error_acc = np.mean([p == t for p, t in pairs if t != -1])
  correct_acc = np.mean([p == -1 for p, t in pairs if t == -1])
  f1 = 2 * error_acc * correct_acc / (error_acc + correct_acc) if error_acc + correct_acc else 0.0
  assert metrics["error_acc"] == pytest.approx(error_acc)
  assert metrics["correct_acc"] == pytest.approx(correct_acc)
  assert metrics["f1"] == pytest.approx(f1)


def test_processbench_step_indexing_reads_the_templates_convention(tmp_path):
  data = tmp_path / "pb.jsonl"
  data.write_text(json.dumps({"id": "pb-0", "problem": "What is 2 + 3 * 4?", "label": 1,
                              "steps": ["3 * 4 = 12.", "2 + 12 = 15."]}) + "\n")
  bench = suites.Benchmark.from_config("pb", {"path": str(data), "kind": "processbench",
                                              "template": "step_critique",
                                              "step_indexing": "deepcritic"}, "pb")
  example, = suites.load_examples(bench)
  prompt = bench.prompt_template().messages(example.record, with_target=False)[-1]["content"]
  assert "<paragraph_2>\n2 + 12 = 15.\n</paragraph_2>" in prompt   # numbered from 1
  texts = ["**Answer**: \\boxed{2}", "**Answer**: \\boxed{1}", "**Answer**: \\boxed{0}"]
  scored, = runner.score_samples(bench, [example], [[runner.Completion(t, 3, False) for t in texts]], None)
  assert [(s["prediction"], s["correct"]) for s in scored] == [(1, True), (0, False), (None, False)]
  with pytest.raises(ValueError, match="pb.step_indexing='two'; choose one of"):
    suites.Benchmark.from_config("pb", {"path": "x", "kind": "processbench", "step_indexing": "two"}, "pb")


def test_processbench_majority_vote_hand_computed():
  bench = suites.Benchmark.from_config("pb", {"path": "x", "kind": "processbench", "n_samples": 3,
                                              "temperature": 0.7, "ks": (1, 3)}, "pb")
  votes = [(-1, [-1, 0, -1]),       # vote -1: right
           (1, [1, 2, 2]),          # vote 2: wrong
           (2, [None, 2, 3]),       # no-index sample does not vote; 2 vs 3 tie -> 2 (seen first): right
           (-1, [None, None, None])]  # no vote: wrong
  records = [{"target": t, "samples": [sample("c", p, p == t) for p in preds]} for t, preds in votes]
  summary = runner.summarize(bench, records)
  assert summary["maj@3_error_acc"] == pytest.approx(1 / 2)
  assert summary["maj@3_correct_acc"] == pytest.approx(1 / 2)
  assert summary["maj@3_f1"] == pytest.approx(0.5)
  # Pooled over samples: errors 2 of 6 right, correct rows 2 of 6 right.
  assert summary["error_acc"] == pytest.approx(2 / 6) and summary["correct_acc"] == pytest.approx(2 / 6)
  assert summary["f1"] == pytest.approx(1 / 3) and summary["missing_rate"] == pytest.approx(4 / 12)
  assert not any(k.startswith("maj@1") for k in summary)
  table = runner.format_table({"benchmarks": {"pb": {**summary, "tokens_per_s": 1.0}}})
  assert "maj@3_f1  50.0" in table


# ------------------------------------------------------------------------------------------------
# Hooks and entry points.


def test_periodic_eval_and_score_critiques(world, model, tmp_path):
  _, cfg, params, tokenizer = model
  config = suite_config(str(tmp_path / "periodic"), heldout=suites.benchmark_entry(
      world["heldout"], "critique", verdict_style="cft", max_new_tokens=NEW_TOKENS, limit=5))
  with runner.PeriodicEval(config, tokenizer, cfg) as periodic:
    metrics = periodic(params, 7)
  assert {"heldout/accuracy", "heldout/balanced_accuracy", "heldout/missing_rate",
          "heldout/by_style/crl/accuracy"} <= set(metrics)
  records = read_jsonl(str(tmp_path / "periodic" / "step_7" / "heldout.jsonl"))
  assert len(records) == 5

  bench = suites.Benchmark("h", world["heldout"], "critique", limit=5)
  heldout = [e.record for e in suites.load_examples(bench)]
  summary, texts = runner.score_critiques(params, cfg, tokenizer, heldout, template="cft", verdict_style="cft",
                                          batch_size=BATCH, max_new_tokens=NEW_TOKENS, prompt_buckets=BUCKETS)
  assert texts == [r["samples"][0]["completion"] for r in records]  # same greedy path
  assert summary["accuracy"] == metrics["heldout/accuracy"]


def test_cli_function_with_demo_config(world, model, tmp_path, capsys):
  overrides = [("benchmarks.heldout.path", world["heldout"]),
               ("benchmarks.heldout.max_new_tokens", str(NEW_TOKENS)),
               ("limit", "4"), ("batch_size", str(BATCH)), ("prompt_buckets", str(BUCKETS)),
               ("output_dir", str(tmp_path)),
               ("progress_bar", "false")]
  args = argparse.Namespace(config="configs/eval_demo.py", ckpt=model[0])
  assert runner.run_command(args, overrides) == 0
  printed = capsys.readouterr().out
  assert "heldout" in printed and "accuracy" in printed and str(tmp_path) in printed
  assert len(read_jsonl(str(tmp_path / "heldout.jsonl"))) == 4


def test_load_for_eval_from_a_run_directory(world, model, tmp_path):
  from cftjax import config as config_lib
  from cftjax.train import checkpoint as checkpoint_lib

  _, cfg, params, _ = model
  run_config = config_lib.base_config()
  run_config.model.tokenizer_dir = world["tokenizer"]
  for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "max_position_embeddings"):
    run_config.model.arch[key] = getattr(cfg, key)
  run_dir = str(tmp_path / "run")
  config_lib.write_run_config(run_dir, run_config)
  checkpoints = checkpoint_lib.RunCheckpoints(run_dir, async_save=False, best_metric="accuracy")
  checkpoints.maybe_save_best(3, params, {"accuracy": 0.75})
  checkpoints.wait()
  checkpoints.close()
  loaded_cfg, loaded, tokenizer = runner.load_for_eval(run_dir, suite_config(str(tmp_path)))
  assert loaded_cfg.vocab_size == cfg.vocab_size == tokenizer.vocab_size
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_eval_writes_nothing_into_the_checkpoint(world, model, tmp_path, monkeypatch, capsys):
  ckpt = model[0]
  before = sorted(str(p.relative_to(ckpt)) for p in pathlib.Path(ckpt).rglob("*"))
  monkeypatch.chdir(tmp_path)
  overrides = [("benchmarks.heldout.path", world["heldout"]), ("benchmarks.heldout.max_new_tokens", "2"),
               ("limit", "2"), ("batch_size", str(BATCH)), ("prompt_buckets", str(BUCKETS)),
               ("progress_bar", "false")]
  args = argparse.Namespace(config=os.path.join(REPO_ROOT, "configs/eval_demo.py"), ckpt=ckpt)
  assert runner.run_command(args, overrides) == 0
  assert sorted(str(p.relative_to(ckpt)) for p in pathlib.Path(ckpt).rglob("*")) == before
  out_dir = tmp_path / "eval_results" / os.path.basename(ckpt) / "demo"
  assert (out_dir / "summary.json").exists() and str(out_dir.relative_to(tmp_path)) in capsys.readouterr().out
