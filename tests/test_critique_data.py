"""`cftjax data critique`: the CRL balance rule and the CFT consistency filter on fixed samples; a
whole run with checkpoints whose answers are known (labels equal math-verify's, rows and drops
counted by hand); and resume after the command is killed mid-run (same output files as an
uninterrupted run)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cftjax import config as config_lib
from cftjax.data import critique, pipeline, sources, synthetic
from cftjax.data.critique import CritiqueRecord
from cftjax.datagen import critique as critique_data
from cftjax.rewards.grading import MathGrader
from cftjax.rewards.sandbox import check_isolation
from cftjax.tokenizer import Tokenizer
from tests.chain_models import save_chain_model
from tests.pipeline_helpers import split_config
from tests.served import start_server, stop_server


def test_balance_rule_on_a_fixed_sample():
  labels = [True, False, True, True, None, False, True]
  candidates = [{"label": label} for label in labels]
  kept, drops = critique_data.balance_crl(candidates, max_rows=8, keep_unbalanced=True)
  assert kept == [0, 1, 2, 5] and drops == {"unlabelled": 1, "crl_balance": 2}  # 2 right + 2 wrong
  kept, drops = critique_data.balance_crl(candidates, max_rows=2, keep_unbalanced=True)
  assert kept == [0, 1] and drops["crl_balance"] == 4
  only_right = [{"label": True}] * 5
  assert critique_data.balance_crl(only_right, 6, True)[0] == [0, 1, 2]
  kept, drops = critique_data.balance_crl(only_right, 6, False)
  assert kept == [] and drops == {"crl_one_label": 5}


def test_consistency_filter_on_a_fixed_sample():
  candidates = [{"label": True}, {"label": False}, {"label": None}]
  critiques = [{"candidate": 0, "critique": "ok. Conclusion: right", "verdict": True},
               {"candidate": 0, "critique": "bad. Conclusion: wrong", "verdict": False},
               {"candidate": 1, "critique": "bad. Conclusion: wrong", "verdict": False},
               {"candidate": 1, "critique": "hmm", "verdict": None},
               {"candidate": 1, "critique": " bad. Conclusion: wrong ", "verdict": False},
               {"candidate": 2, "critique": "ok. Conclusion: right", "verdict": True},
               {"candidate": 0, "critique": "fine. Conclusion: right", "verdict": True}]
  kept, drops = critique_data.filter_critiques(candidates, critiques, max_rows=3)
  assert kept == [0, 2, 6]
  assert drops == {"verdict_disagrees": 1, "no_verdict": 1, "duplicate_critique": 1, "unlabelled_candidate": 1}
  kept, drops = critique_data.filter_critiques(candidates, critiques, max_rows=2)
  assert kept == [0, 2] and drops["cft_problem_cap"] == 1


# Gold answers; generator "five" always answers 5 and "two" always 2 (math-verify decides 5.0, 10/2).
GOLDS = ["5", "2", "5.0", "\\frac{10}{2}", "7"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("critique_data")
  world = synthetic.write_world(str(root / "world"), num_train=20, num_heldout=4)
  tokenizer = Tokenizer.from_dir(world["tokenizer"])
  prompt_end = list(critique.render_prompt(CritiqueRecord(question="q"), "math_cot", tokenizer))
  models = {}
  for name, text in (("five", "So \\boxed{5}"), ("two", "So \\boxed{2}"), ("says_right", "Conclusion: right [END]"),
                     ("says_wrong", "Conclusion: wrong [END]")):
    models[name] = str(root / name)
    save_chain_model(models[name], world["tokenizer"], prompt_end, text)
  problems = str(root / "problems.jsonl")
  with open(problems, "w", encoding="utf-8") as f:
    for i, gold in enumerate(GOLDS * 2):  # ten problems (the kill test needs a run long enough to interrupt)
      f.write(json.dumps({"id": f"p{i}", "question": f"Problem {i}?", "reference_answer": gold}) + "\n")
  config_file = str(root / "config.py")
  with open(config_file, "w", encoding="utf-8") as f:
    f.write(f"""
from cftjax.datagen.critique import base_config

def get_config():
  c = base_config()
  c.input = {problems!r}
  c.generators.five = {{"ckpt": {models['five']!r}}}
  c.generators.two = {{"ckpt": {models['two']!r}}}
  c.teachers.says_right = {{"ckpt": {models['says_right']!r}}}
  c.teachers.says_wrong = {{"ckpt": {models['says_wrong']!r}}}
  c.samples_per_problem, c.max_new_tokens, c.teacher_max_new_tokens = 2, 12, 12
  c.crl_max_per_problem, c.cft_max_per_problem = 4, 4
  c.grader_workers, c.progress_bar = 1, False
  return c
""")
  return config_file, problems


def test_step_split_and_first_error():
  assert critique_data.split_steps("a\n\n\n\n b \n\nc\n") == ["a", "b", "c"]
  assert critique_data.first_error_step([0.5, 0.25, 0.0, 0.0]) == 2
  assert critique_data.first_error_step([1.0, 0.125]) == -1
  assert critique_data.first_error_step([0.0]) == 0


@pytest.fixture(scope="module")
def stepwise(setup):
  """A generator that writes "Sum.", a blank line, then "So \\boxed{5}" (two steps)."""
  config_file, _ = setup
  root = os.path.dirname(config_file)
  tokenizer_dir = os.path.join(root, "world", "tokenizer")
  prompt_end = list(critique.render_prompt(CritiqueRecord(question="q"), "math_cot", Tokenizer.from_dir(tokenizer_dir)))
  path = os.path.join(root, "stepwise")
  save_chain_model(path, tokenizer_dir, prompt_end, "Sum.\n\nSo \\boxed{5}")
  return path


def _step_label_run(problems: str, generator: dict, out: str) -> dict:
  config = critique_data.base_config()
  config.input, config.limit = problems, 2
  config.generators.stepwise = generator
  config.samples_per_problem, config.max_new_tokens, config.step_rollouts = 2, 12, 3
  config.grader_workers, config.progress_bar = 1, False
  result = critique_data.run(config, out)
  rows = _read(os.path.join(out, "steps.jsonl"))
  # Gold 5: the rollouts from "Sum." all reach \boxed{5} (value 1), and the solution is right: no error.
  # Gold 2: no rollout from "Sum." is right (value 0): the first step is the first error.
  assert [(r["id"], r["steps"], r["error_step"], r["label"]) for r in rows] == [
      ("p0/steps/0", ["Sum.", "So \\boxed{5}"], -1, True), ("p1/steps/0", ["Sum.", "So \\boxed{5}"], 0, False)]
  work = _read(os.path.join(out, "work.jsonl"))
  assert [w["candidates"][0]["step_values"] for w in work] == [[1.0, 1.0], [0.0]]
  assert result["counts"]["step_rows"] == 2 and result["files"]["steps"] == "steps.jsonl"
  return result


def test_monte_carlo_step_labels(setup, stepwise, tmp_path):
  _step_label_run(setup[1], {"ckpt": stepwise}, str(tmp_path / "out"))


@pytest.mark.slow
def test_monte_carlo_step_labels_through_a_served_endpoint(setup, stepwise, tmp_path):
  """The same generator behind a real `cftjax serve`: candidates by chat completions, each prefix's
  rollouts by `continue_final_message`; the same step labels as in process."""
  base, proc = start_server(stepwise)
  try:
    _step_label_run(setup[1], {"endpoint": f"{base}/v1"}, str(tmp_path / "out"))
  finally:
    stop_server(proc)


def _read(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def five_problems(setup, tmp_path_factory):
  """(the run's result, its output directory) of the test config on the first five problems."""
  config = config_lib.load_config(setup[0], [("limit", "5")])
  out = str(tmp_path_factory.mktemp("five_problems") / "out")
  return critique_data.run(config, out), out


def test_run_labels_rows_and_manifest(five_problems):
  result, out = five_problems
  work = _read(os.path.join(out, "work.jsonl"))
  labels = [[c["label"] for c in item["candidates"]] for item in work]
  assert labels == [[True, False], [False, True], [True, False], [True, False], [False, False]]
  with MathGrader(1) as grader:
    by_math_verify = [ok for ok, _ in grader.grade_many(GOLDS + GOLDS, ["So \\boxed{5}"] * 5 + ["So \\boxed{2}"] * 5)]
  assert [item["candidates"][0]["label"] for item in work] + [item["candidates"][1]["label"] for item in work] \
      == by_math_verify
  crl = _read(os.path.join(out, "crl.jsonl"))
  # Problems 0-3: one right and one wrong candidate each; problem 4: two wrong, kept (up to 4 // 2).
  assert [(r["id"], r["label"]) for r in crl] == [(f"p{i}/crl/{j}", label) for i in range(5)
                                                   for j, label in enumerate(labels[i])]
  cft = _read(os.path.join(out, "cft.jsonl"))
  # Each candidate keeps the critique of the teacher whose verdict matches its label.
  assert [(r["solution"], r["critique"], r["label"]) for r in cft[:2]] == [
      ("So \\boxed{5}", "Conclusion: right [END]", True), ("So \\boxed{2}", "Conclusion: wrong [END]", False)]
  assert len(cft) == 10 and all(critique.parse_verdict(r["critique"]) == r["label"] for r in cft)
  manifest = json.load(open(os.path.join(out, "manifest.json"), encoding="utf-8"))
  assert manifest["counts"] == {"candidates": 20, "cft_rows": 10, "critiques": 20, "crl_right": 4, "crl_rows": 10,
                                "crl_wrong": 6, "problems": 5, "right": 4, "step_rows": 0,
                                "wrong": 6}
  assert manifest["drops"] == {"duplicate_solution": 10, "verdict_disagrees": 10}
  assert result["counts"] == manifest["counts"] and result["problems_per_min"] > 0
  assert sorted(manifest["sources"]["teachers"]) == ["says_right", "says_wrong"]


def test_array_record_rows_read_by_the_training_pipeline_equal_the_jsonl_rows(setup, five_problems, tmp_path):
  """A finished run re-assembled as ArrayRecord (no generation: the work is done) holds the JSONL
  rows: the same records from the pipeline's sources and the same CFT training batches."""
  _, jsonl_out = five_problems
  out = str(tmp_path / "out")
  shutil.copytree(jsonl_out, out)
  config = config_lib.load_config(setup[0], [("limit", "5"), ("output_format", "array_record")])
  result = critique_data.run(config, out)
  assert result["files"] == {"crl": "crl.array_record", "cft": "cft.array_record"}
  assert result["output_format"] == "array_record" and result["counts"]["cft_rows"] == 10
  assert sorted(os.listdir(out)) == ["cft.array_record", "crl.array_record", "manifest.json", "settings.json",
                                     "work.jsonl"]
  for kind in ("crl", "cft"):
    jsonl_rows, _ = sources.open_source({"path": os.path.join(jsonl_out, f"{kind}.jsonl")})
    array_rows, info = sources.open_source({"path": os.path.join(out, f"{kind}.array_record")})
    assert info.kind == "array_record" and len(array_rows) == len(jsonl_rows) == 10
    assert [array_rows[i] for i in range(10)] == [jsonl_rows[i] for i in range(10)]
  tokenizer = Tokenizer.from_dir(os.path.join(os.path.dirname(setup[0]), "world", "tokenizer"))
  batches = {}
  for name, path in (("jsonl", os.path.join(jsonl_out, "cft.jsonl")), ("array_record", os.path.join(out, "cft.array_record"))):
    data, stream = split_config({"template": "cft", "max_seq_len": 96, "packing": False, "sources": [{"path": path}],
                                 "batch_size": 4, "num_epochs": 1})
    batches[name] = list(pipeline.make_cft_iterator(data, tokenizer, **stream))
  assert len(batches["jsonl"]) == 3 and batches["jsonl"][0]["loss_mask"].sum() > 0
  for a, b in zip(batches["jsonl"], batches["array_record"], strict=True):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_files(setup, tmp_path):
  """Killed and resumed with ArrayRecord output; both runs then re-assembled as JSONL."""
  config_file, _ = setup
  array_record = [("output_format", "array_record")]
  reference = str(tmp_path / "reference")
  critique_data.run(config_lib.load_config(config_file, array_record), reference)

  out = str(tmp_path / "killed")
  command = [sys.executable, "-m", "cftjax.cli", "data", "critique", "--config", config_file, "--out", out,
             "--config.output_format=array_record"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  work_path = os.path.join(out, "work.jsonl")
  deadline = time.monotonic() + 300
  while proc.poll() is None and time.monotonic() < deadline:
    if os.path.exists(work_path) and os.path.getsize(work_path) > 0:
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, proc.stdout.read()
  done_before = len(open(work_path, encoding="utf-8").read().splitlines())
  assert 1 <= done_before < 10 and not os.path.exists(os.path.join(out, "manifest.json"))

  resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr
  assert "problems: 10" in resumed.stdout
  names = ["crl.array_record", "cft.array_record", "manifest.json", "work.jsonl"]
  _assert_same_files(reference, out, names)
  for directory in (reference, out):
    critique_data.run(config_lib.load_config(config_file, []), directory)
  _assert_same_files(reference, out, ["crl.jsonl", "cft.jsonl", "manifest.json"])


def _assert_same_files(dir_a: str, dir_b: str, names: list[str]) -> None:
  for name in names:
    with open(os.path.join(dir_a, name), "rb") as a, open(os.path.join(dir_b, name), "rb") as b:
      assert a.read() == b.read(), name


def test_code_labels_follow_the_sandbox_and_the_pass_rate_rule():
  check_isolation("bwrap")
  problem = CritiqueRecord(question="Print twice the number read.", id="code0",
                           tests={"inputs": ["1\n", "2\n", "3\n", "4\n", "5\n"], "outputs": ["2\n", "4\n", "6\n", "8\n", "10\n"]})
  program = "```python\nn = int(input())\nprint({})\n```"
  solutions = [program.format("n * 2"),                    # 5 / 5 tests
               program.format("n * 2 if n != 5 else 0"),   # 4 / 5 = 0.8, not above the 0.8 rule
               program.format("n + 2"),                    # 1 / 5 (n = 2)
               "no code block"]
  config = critique_data.base_config()
  config.grader_workers = 1
  builder = critique_data.Builder(config)
  try:
    labels = builder._labels(problem, solutions)  # pylint: disable=protected-access
  finally:
    builder.close()
  assert [label for label, _ in labels] == [True, False, False, False]
  assert [reason.split(";")[0] for _, reason in labels[:3]] == ["5/5 tests passed", "4/5 tests passed",
                                                               "1/5 tests passed"]
  config.label_min_pass_rate = 0.7
  builder = critique_data.Builder(config)
  try:
    assert [label for label, _ in builder._labels(problem, solutions[:2])] == [True, True]  # pylint: disable=protected-access
  finally:
    builder.close()


def test_rule_teacher_checks_the_boxed_sum_column_by_column():
  teacher = critique_data._teacher({"rule": "synthetic_addition"}, "config.teachers.rule")  # pylint: disable=protected-access
  right, wrong, unboxed = teacher.critique_each(
      "What is 57 + 68?", ["7+8+0=15, 5+6+1=12. \\boxed{125}", "7+8+0=15, 5+6+0=11. \\boxed{115}", "125"])
  assert right == ("From the right: 7+8+0=15 vs 5 ok, 5+6+1=12 vs 2 ok, carry 1 vs 1 ok. "
                   "All digits match. Conclusion: right [END]")
  assert wrong == ("From the right: 7+8+0=15 vs 5 ok, 5+6+1=12 vs 1 no, carry 1 vs 1 ok. "
                   "A digit does not match. Conclusion: wrong [END]")
  assert [critique.parse_verdict(t, "cft") for t in (right, wrong, unboxed)] == [True, False, False]
  with pytest.raises(ValueError, match="synthetic additions only"):
    teacher.critique_each("What is 2 * 3?", ["\\boxed{6}"])
  with pytest.raises(ValueError, match="config.teachers.rule.rule='llm'"):
    critique_data._teacher({"rule": "llm"}, "config.teachers.rule")  # pylint: disable=protected-access
