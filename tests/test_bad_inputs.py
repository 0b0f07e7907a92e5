"""Bad input through the real `cftjax` command line: each ends in ONE line `cftjax: error: ...` naming
the culprit and the fix, a non-zero exit code and no traceback; `--debug` shows the traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cftjax import cli
from cftjax import config as config_lib
from cftjax.data import synthetic
from cftjax.models import ModelConfig, checkpoint_io, init_params
from cftjax.models import attention
from cftjax.models.checkpoint_io import save_model_checkpoint
from cftjax.models.hf_io import save_hf
from cftjax.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo_cft.py")
TINY = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                   num_kv_heads=1, head_dim=8, model_type="llama")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bad_inputs") / "world")
  synthetic.write_world(path, seed=0, num_train=20, num_heldout=4)
  return path


def run_cli(capsys, args: list[str]) -> tuple[int, str]:
  """(exit code, the error line) of `cftjax ARGS`; asserts stderr ends in that one line, the only
  error there (a progress bar may precede it), with no traceback."""
  code = cli.main(["--log_level=ERROR"] + args)
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if "error" in line.lower()]
  assert errors == [err.strip().splitlines()[-1]] and errors[0].startswith("cftjax: error: "), err
  assert "Traceback" not in err
  return code, errors[0]


def train_args(world: str, run_dir: str, **overrides) -> list[str]:
  """`train` on the synthetic world with a tiny model; no eval, so bad input is the only failure."""
  values = {"train.run_dir": run_dir, "data.world_dir": world, "train.steps": 1, "optim.warmup_ratio": 0,
            "data.batch_size": 8, "eval.loss_batches": 0, "eval.verdict_examples": 0,
            "checkpoint.best_metric": "", "logging.progress_bar": "false",
            "logging.tensorboard": "false", "model.arch.hidden_size": 16,
            "model.arch.intermediate_size": 32, "model.arch.num_layers": 1} | overrides
  return ["train", "--config", DEMO_CONFIG] + [f"--config.{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def hf_template(tmp_path_factory):
  """A tiny Hugging Face model directory written by cftjax's own exporter, in several shards."""
  path = str(tmp_path_factory.mktemp("hf_template") / "hf")
  save_hf(TINY, init_params(TINY, jax.random.key(0)), path, max_shard_size="2KB")
  return path


@pytest.fixture()
def hf_dir(hf_template, tmp_path):
  """A fresh copy of the template for a test to damage."""
  return shutil.copytree(hf_template, str(tmp_path / "hf"))


def convert_args(hf_dir: str, out: str) -> list[str]:
  return ["convert", "--hf-dir", hf_dir, "--out", out]


def shards(hf_dir: str) -> list[str]:
  return sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))


# ------------------------------------------------------------------------------------------------
# Model files.


def test_truncated_safetensors(hf_dir, tmp_path, capsys):
  shard = os.path.join(hf_dir, shards(hf_dir)[0])
  with open(shard, "rb") as f:
    data = f.read()
  with open(shard, "wb") as f:
    f.write(data[:len(data) // 2])
  code, line = run_cli(capsys, convert_args(hf_dir, str(tmp_path / "out")))
  assert code == 1 and shard in line and "re-download or re-export it" in line


def test_corrupt_safetensors_header(hf_dir, tmp_path, capsys):
  shard = os.path.join(hf_dir, shards(hf_dir)[-1])
  with open(shard, "r+b") as f:
    f.write(b"\xff" * 16)  # the header length and the start of its JSON
  code, line = run_cli(capsys, convert_args(hf_dir, str(tmp_path / "out")))
  assert code == 1 and shard in line and "not a readable safetensors file" in line


def test_missing_shard(hf_dir, tmp_path, capsys):
  missing = shards(hf_dir)[1]
  os.remove(os.path.join(hf_dir, missing))
  code, line = run_cli(capsys, convert_args(hf_dir, str(tmp_path / "out")))
  assert code == 1 and missing in line and "model.safetensors.index.json lists shard(s)" in line


def test_unsupported_config_json(hf_dir, tmp_path, capsys):
  path = os.path.join(hf_dir, "config.json")
  with open(path) as f:
    hf_config = json.load(f)
  with open(path, "w") as f:
    json.dump(hf_config | {"model_type": "gpt2"}, f)
  code, line = run_cli(capsys, convert_args(hf_dir, str(tmp_path / "out")))
  assert code == 1 and path in line and "model_type 'gpt2' is not supported; supported:" in line


def test_tokenizer_vocab_larger_than_the_model(world, tmp_path, capsys):
  code, line = run_cli(capsys, train_args(world, str(tmp_path / "run"), **{"model.arch.vocab_size": 8}))
  assert code == 1
  assert os.path.join(world, "tokenizer") in line and "model's vocab_size is 8" in line
  assert "use the checkpoint's own tokenizer or a model with vocab_size >=" in line


# ------------------------------------------------------------------------------------------------
# Config, mesh and run directory.


def test_mesh_that_does_not_match_the_devices(world, tmp_path, capsys):
  code, line = run_cli(capsys, train_args(world, str(tmp_path / "run"), **{"mesh.data": 3, "mesh.fsdp": 1}))
  assert code == 1
  assert (f"the product 3 does not match the {jax.device_count()} devices; "
          "change mesh.data/fsdp/tensor") in line


def test_eval_batch_that_does_not_split_over_the_devices(world, tmp_path, capsys):
  code, line = run_cli(capsys, train_args(world, str(tmp_path / "run"), **{
      "eval.loss_batches": 1, "eval.batch_size": jax.device_count() + 1}))
  assert code == 1 and "eval.batch_size: global batch" in line and "change the batch size" in line


@pytest.mark.parametrize("overrides, message", [
    ({"model.attention": "flash"}, "config.model: attention='flash'; choose one of ('auto', 'xla', 'blocked', 'cpu', 'cudnn', 'splash')"),
    ({"model.attention": "cudnn"}, "config.model: attention='cudnn' needs dtype bfloat16 or float16"),
    pytest.param({"model.attention": "cudnn", "model.dtype": "bfloat16"},
                 "model.attention='cudnn' runs on GPUs only (JAX's backend here is 'cpu')",
                 marks=pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU message")),
])
def test_attention_settings_that_cannot_run(world, tmp_path, capsys, overrides, message):
  code, line = run_cli(capsys, train_args(world, str(tmp_path / "run"), **overrides))
  assert code == 2 and message in line, line


def test_length_based_attention_refuses_packed_rows():
  with pytest.raises(config_lib.ConfigError, match="model.attention='cudnn' takes one sequence per row: "
                     "set --config.data.packing=False"):
    attention.check_backend("cudnn", "gpu", packed_rows=True)
  attention.check_backend("cudnn", "gpu", packed_rows=False)  # one sequence per row: accepted


def test_unknown_config_key(world, tmp_path, capsys):
  code, line = run_cli(capsys, train_args(world, str(tmp_path / "run"), **{"optim.lrr": 1e-3}))
  assert code == 2 and line.startswith("cftjax: error: unknown config key 'config.optim.lrr'; did you "
                                       "mean 'config.optim.lr'")


def test_run_dir_written_by_another_config(world, tmp_path, capsys):
  run_dir = str(tmp_path / "run")
  assert cli.main(["--log_level=ERROR"] + train_args(world, run_dir, **{"model.arch.hidden_size": 64})) == 0
  capsys.readouterr()
  code, line = run_cli(capsys, train_args(world, run_dir))
  assert code == 2 and os.path.join(run_dir, "config.json") in line
  assert "model.arch.hidden_size: 64 -> 16" in line and "use a new --config.train.run_dir" in line


def test_malformed_data_rows(world, tmp_path, capsys):
  rows = str(tmp_path / "rows.jsonl")
  with open(os.path.join(world, "train.jsonl")) as f:
    good = f.readlines()[:8]
  with open(rows, "w") as f:
    f.writelines(good[:3] + ['{"question": "1 + 1", "solution": \n'] + good[3:])
  code, line = run_cli(capsys, train_args(world, str(tmp_path / "run"), **{"data.train_path": rows}))
  assert code == 1 and f"{rows} line 4" in line and "on_bad_row" in line


# ------------------------------------------------------------------------------------------------
# Config values and config files.


def tree(path: str) -> dict[str, bytes]:
  """{relative path: bytes} of every file under `path` ({} if it does not exist)."""
  files = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        files[os.path.relpath(full, path)] = f.read()
  return files


def test_negative_train_steps(world, tmp_path, capsys):
  run_dir = str(tmp_path / "run")
  code, line = run_cli(capsys, train_args(world, run_dir, **{"train.steps": -5}))
  assert code == 2 and "train.steps=-5: it must be >= 0" in line and "set --config.train.steps" in line
  assert not os.path.exists(run_dir)


@pytest.mark.parametrize("body, line_number, message", [
    ("  c.train.steps = 10 // 0\n", 5, "ZeroDivisionError: integer division or modulo by zero"),
    ("  c.train.steps = = 3\n", 5, "SyntaxError: invalid syntax"),
    ("  raise ValueError('set DATA_ROOT first')\n", 5, "ValueError: set DATA_ROOT first"),
])
def test_config_file_that_raises(tmp_path, capsys, body, line_number, message):
  config_file = str(tmp_path / "broken.py")
  with open(config_file, "w") as f:
    f.write(f"from cftjax.config import base_config\n\ndef get_config():\n  c = base_config()\n{body}"
            f"  c.train.run_dir = {str(tmp_path / 'run')!r}\n  return c\n")
  code, line = run_cli(capsys, ["train", "--config", config_file])
  assert code == 2 and f"{config_file} line {line_number}: {message}" in line, line
  assert "fix it there" in line
  assert not os.path.exists(tmp_path / "run")


def test_config_file_whose_sibling_module_raises(tmp_path, capsys):
  (tmp_path / "paths.py").write_text("import os\n\nDATA = os.environ['NO_SUCH_VARIABLE_SET']\n")
  config_file = str(tmp_path / "exp.py")
  with open(config_file, "w") as f:
    f.write("from cftjax.config import base_config\nimport paths\n\ndef get_config():\n  return base_config()\n")
  code, line = run_cli(capsys, ["train", "--config", config_file])
  assert code == 2 and f"{tmp_path / 'paths.py'} line 3: KeyError: 'NO_SUCH_VARIABLE_SET'" in line, line


def test_relative_warmstart_config_that_does_not_resolve(tmp_path, capsys):
  config_file = str(tmp_path / "crl.py")
  with open(config_file, "w") as f:
    f.write(f"""from cftjax.config import base_config

def get_config():
  c = base_config()
  c.train.objective = "grpo"
  c.train.steps = 1
  c.train.run_dir = {str(tmp_path / "run")!r}
  c.data.synthetic_world = True
  c.data.world_dir = {str(tmp_path / "world")!r}
  c.data.world.num_train = 20
  c.data.world.num_heldout = 4
  c.model.init_from_run = {str(tmp_path / "warm")!r}
  c.model.warmstart_config = "missing_cft.py"
  return c
""")
  code, line = run_cli(capsys, ["train", "--config", config_file])
  assert code == 2
  assert f"model.warmstart_config={str(tmp_path / 'missing_cft.py')!r}: no such config file" in line
  assert "relative to that file's directory" in line and "fix the path" in line
  assert sorted(os.listdir(tmp_path)) in (["crl.py"], ["__pycache__", "crl.py"])

  code, line = run_cli(capsys, ["train", "--config", config_file, "--config.model.warmstart_config=cft.py"])
  assert code == 2 and f"no such config file (relative to the working directory {os.getcwd()})" in line
  assert not any(os.path.exists(tmp_path / d) for d in ("run", "world", "warm"))


# ------------------------------------------------------------------------------------------------
# convert, generate, eval.


def test_convert_into_an_existing_out_is_refused_before_reading_weights(hf_template, hf_dir, tmp_path,
                                                                        capsys):
  out = str(tmp_path / "out")
  assert cli.main(["--log_level=ERROR"] + convert_args(hf_dir, out)) == 0
  capsys.readouterr()
  before = tree(out)
  shard = os.path.join(hf_dir, shards(hf_dir)[0])
  with open(shard, "r+b") as f:  # a weight read now would fail with the shard's error instead
    f.truncate(100)
  code, line = run_cli(capsys, convert_args(hf_dir, out))
  assert code == 1 and f"{os.path.join(out, 'params')} already exists; choose an empty --out" in line
  assert tree(out) == before

  export_out = str(tmp_path / "exported")
  shutil.copytree(hf_template, export_out)
  before = tree(export_out)
  code, line = run_cli(capsys, ["convert", "--to-hf", "--ckpt", str(tmp_path / "no_such_ckpt"),
                                "--out", export_out])
  assert code == 1 and f"{export_out} already holds a Hugging Face model (config.json" in line
  assert "choose an empty --out directory" in line and tree(export_out) == before


@pytest.fixture(scope="module")
def short_context_ckpt(world, tmp_path_factory):
  """A model checkpoint with the world's tokenizer and max_position_embeddings 128."""
  path = str(tmp_path_factory.mktemp("short_context") / "ckpt")
  tokenizer_dir = os.path.join(world, "tokenizer")
  cfg = ModelConfig(vocab_size=Tokenizer.from_dir(tokenizer_dir).vocab_size, hidden_size=16,
                    intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                    max_position_embeddings=128)
  save_model_checkpoint(path, cfg, init_params(cfg, jax.random.key(0)), tokenizer_dir)
  return path


def test_generate_past_max_position_embeddings(short_context_ckpt, capsys):
  args = ["generate", "--ckpt", short_context_ckpt, "--prompt", "What is 1 + 2?", "--max-new-tokens"]
  code, line = run_cli(capsys, args + ["1000"])
  assert code == 2 and "--max-new-tokens=1000: the longest prompt (" in line
  assert "exceeds the model's max_position_embeddings=128; lower --max-new-tokens to at most" in line
  most = int(line.split("at most ")[1].split()[0])
  assert cli.main(["--log_level=ERROR"] + args + [str(most)]) == 0  # the limit it names is exact
  assert cli.main(["--log_level=ERROR"] + args + [str(most + 1)]) == 2


def test_eval_with_an_empty_suite(short_context_ckpt, tmp_path, capsys):
  config_file = str(tmp_path / "eval_empty.py")
  with open(config_file, "w") as f:
    f.write("from cftjax.eval.suites import base_suite_config\n\ndef get_config():\n"
            "  return base_suite_config('empty')\n")
  code, line = run_cli(capsys, ["eval", "--config", config_file, "--ckpt", short_context_ckpt])
  assert code == 2 and "config.benchmarks of eval suite 'empty' is empty: nothing to evaluate" in line
  assert "benchmark_entry(path, kind)" in line
  assert not os.path.exists(os.path.join(short_context_ckpt, "eval"))


# ------------------------------------------------------------------------------------------------
# data build.


def rows_with_bad_json(world: str, path: str) -> int:
  """Writes 8 good rows with a malformed JSON line 4 to `path`; returns the good row count."""
  with open(os.path.join(world, "train.jsonl")) as f:
    good = f.readlines()[:8]
  with open(path, "w") as f:
    f.writelines(good[:3] + ['{"question": "1 + 1", "solution": \n'] + good[3:])
  return len(good)


def test_data_build_skips_malformed_json_lines(world, tmp_path, capsys):
  rows, out = str(tmp_path / "rows.jsonl"), str(tmp_path / "tfds")
  num_good = rows_with_bad_json(world, rows)
  build = ["data", "build", "--input", rows, "--out", out, "--name", "rows"]
  code, line = run_cli(capsys, build)
  assert code == 1 and f"{rows} line 4: malformed JSON" in line and "--on-bad-row skip" in line
  assert not os.path.exists(out)

  assert cli.main(["--log_level=WARNING"] + build + ["--on-bad-row", "skip"]) == 0
  captured = capsys.readouterr()
  assert f"skipping unreadable row: {rows} line 4: malformed JSON" in captured.err
  assert f"{rows}: skipped 1 unreadable row(s) of {num_good + 1}" in captured.err
  dataset_dir = captured.out.strip().splitlines()[-1]
  assert len(tfds.builder_from_directory(dataset_dir).as_data_source("train")) == num_good


def test_data_build_into_an_existing_version(world, tmp_path, capsys):
  out = str(tmp_path / "tfds")
  build = ["data", "build", "--input", os.path.join(world, "heldout.jsonl"), "--out", out, "--name", "rows"]
  assert cli.main(["--log_level=ERROR"] + build) == 0
  dataset_dir = capsys.readouterr().out.strip().splitlines()[-1]
  before = tree(out)
  code, line = run_cli(capsys, build)
  assert code == 1 and f"{dataset_dir} already exists" in line and "--overwrite" in line
  assert tree(out) == before

  bad = str(tmp_path / "bad.jsonl")  # a failed --overwrite leaves the old version as it was
  rows_with_bad_json(world, bad)
  code, line = run_cli(capsys, build[:3] + [bad] + build[4:] + ["--overwrite"])
  assert code == 1 and f"{bad} line 4" in line and tree(out) == before

  assert cli.main(["--log_level=ERROR"] + build[:3] + [os.path.join(world, "train.jsonl")] + build[4:]
                  + ["--overwrite"]) == 0
  assert len(tfds.builder_from_directory(dataset_dir).as_data_source("train")) == 20
  assert sorted(os.listdir(os.path.join(out, "rows"))) == ["1.0.0"]  # no build directory left


# ------------------------------------------------------------------------------------------------
# The math grader started from a script (piped on stdin, or without a main guard).

GRADE_SCRIPT = "from cftjax.rewards.grading import grade_math\nprint(grade_math('1', r'\\boxed{1}'))\n"


def run_script(script: str, pythonpath: str, script_file: str = "-") -> subprocess.CompletedProcess:
  """`python -` with `script` on stdin (or `python SCRIPT_FILE`, the file holding it)."""
  if script_file != "-":
    with open(script_file, "w") as f:
      f.write(script)
  env = dict(os.environ, PYTHONPATH=pythonpath)
  return subprocess.run([sys.executable, script_file], input=script, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("on_stdin", [True, False], ids=["piped_on_stdin", "file_without_main_guard"])
def test_math_grader_from_a_script(tmp_path, on_stdin):
  result = run_script(GRADE_SCRIPT, REPO, "-" if on_stdin else str(tmp_path / "grade.py"))
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "(True, 'correct')"


def test_math_grader_that_cannot_start_names_the_cause(tmp_path):
  broken = tmp_path / "site" / "math_verify"
  broken.mkdir(parents=True)
  (broken / "__init__.py").write_text("raise ImportError('antlr4 runtime missing')\n")
  started = time.perf_counter()
  result = run_script(GRADE_SCRIPT, f"{tmp_path / 'site'}{os.pathsep}{REPO}")
  assert time.perf_counter() - started < 60
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("cftjax.rewards.grading.GraderError: math grader worker process could not "
                         "start: ImportError: antlr4 runtime missing; check that math-verify imports"), last


# ------------------------------------------------------------------------------------------------
# --debug and the real process.


def test_debug_shows_the_traceback(world, tmp_path):
  with pytest.raises(ValueError, match="does not match the"):
    cli.main(["--debug", "--log_level=ERROR"] + train_args(world, str(tmp_path / "run"),
                                                           **{"mesh.data": 3, "mesh.fsdp": 1}))


def test_console_exit_code_and_stderr(world, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-m", "cftjax.cli", "--log_level=ERROR"] + train_args(
      world, str(tmp_path / "run"), **{"model.arch.vocab_size": 8}), cwd=REPO, env=env,
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().startswith("cftjax: error: The tokenizer of")
  assert "Traceback" not in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ------------------------------------------------------------------------------------------------
# Checkpoints of a run: which params `generate` reads, damaged checkpoint files, a full disk.


def trained_run(capsys, world: str, run_dir: str, **overrides) -> str:
  """A tiny run trained in-process (2 steps, a checkpoint at each)."""
  args = train_args(world, run_dir, **({"train.steps": 2, "checkpoint.every_steps": 1} | overrides))
  assert cli.main(["--log_level=ERROR"] + args) == 0
  capsys.readouterr()
  return run_dir


def test_generate_on_a_run_without_best_names_what_exists(world, tmp_path, capsys):
  """checkpoint.best_metric is set but no eval ran: RUN_DIR:best says so and how to pick a step;
  plain RUN_DIR reads the latest step."""
  run_dir = trained_run(capsys, world, str(tmp_path / "run"), **{"checkpoint.best_metric": "eval_loss",
                                                                  "checkpoint.best_mode": "min"})
  code, line = run_cli(capsys, ["generate", "--ckpt", f"{run_dir}:best", "--prompt", "1+2"])
  assert code == 1 and "set checkpoint.best_metric" not in line
  assert line == (f"cftjax: error: {run_dir}:best: the run has no best/ checkpoint: no eval has saved "
                  "one yet (checkpoint.best_metric='eval_loss') (saved steps [1, 2], no best/); use "
                  f"{run_dir}:latest or {run_dir}:step=N")
  assert cli.main(["--log_level=ERROR", "generate", "--ckpt", run_dir, "--prompt", "1+2",
                   "--max-new-tokens", "4"]) == 0


def test_corrupt_data_iterator_json_in_a_checkpoint(world, tmp_path, capsys):
  run_dir = trained_run(capsys, world, str(tmp_path / "run"), **{"checkpoint.max_to_keep": 1})
  path = os.path.join(run_dir, "checkpoints", "2", "data", "process_0-of-1.json")
  with open(path, "w") as f:
    f.write('{"parent": {"next\x01index": 8}}')
  code, line = run_cli(capsys, train_args(world, run_dir, **{"train.steps": 3}))
  assert code == 1 and line.startswith(f"cftjax: error: {path}: not valid JSON (Invalid control character")
  assert f"move {os.path.join(run_dir, 'checkpoints', '2')} aside" in line
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["2"]  # nothing moved or lost


def test_checkpoint_step_without_its_metadata(world, tmp_path, capsys):
  run_dir = trained_run(capsys, world, str(tmp_path / "run"), **{"checkpoint.max_to_keep": 1})
  step_dir = os.path.join(run_dir, "checkpoints", "2")
  os.remove(os.path.join(step_dir, "state", "_METADATA"))
  code, line = run_cli(capsys, train_args(world, run_dir, **{"train.steps": 3}))
  assert code == 1 and "pytree structure" not in line
  assert line.startswith(f"cftjax: error: {step_dir}/state/_METADATA is missing: the checkpoint step dir "
                         f"{step_dir} is incomplete")


@pytest.fixture()
def small_disk(tmp_path):
  """A tmpfs mounted at tmp_path/disk (root only); resized by the test, unmounted afterwards."""
  mount_point = str(tmp_path / "disk")
  os.makedirs(mount_point)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mount_point],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  yield mount_point
  subprocess.run(["umount", "-l", mount_point], check=True)


def _used_bytes(path: str) -> int:
  stat = os.statvfs(path)
  return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def test_disk_full_during_an_async_save(world, tmp_path, capsys, small_disk):
  """A run resumed on a disk with room for half a checkpoint more: the save of step 4 hits a real
  ENOSPC; one line names ENOSPC and the directory, exit code 1, and step 2 still restores."""
  built = trained_run(capsys, world, str(tmp_path / "built"), **{"checkpoint.every_steps": 2})
  run_dir = shutil.copytree(built, os.path.join(small_disk, "run"))
  one_step = _used_bytes(small_disk)
  shutil.copytree(os.path.join(run_dir, "checkpoints", "2"), os.path.join(small_disk, "probe"))
  one_step = _used_bytes(small_disk) - one_step
  shutil.rmtree(os.path.join(small_disk, "probe"))
  size = _used_bytes(small_disk) + one_step // 2
  subprocess.run(["mount", "-o", f"remount,size={size}", small_disk], check=True)
  code, line = run_cli(capsys, train_args(world, run_dir, **{"train.steps": 4, "checkpoint.every_steps": 2}))
  assert code == 1
  assert line.startswith(f"cftjax: error: {os.path.join(run_dir, 'checkpoints')}: no space left on device "
                         "(ENOSPC) while saving")
  assert "step 2 is intact" in line
  target = checkpoint_io.params_target(checkpoint_io.build_model(
      checkpoint_io.read_run_config(run_dir).model)[0], dtype="float32")
  step, params = checkpoint_io.load_run_params(f"{run_dir}:step=2", target)
  _, original = checkpoint_io.load_run_params(f"{built}:step=2", target)
  assert step == 2 and checkpoint_io.run_steps(run_dir)[0] == [2]
  jax.tree.map(np.testing.assert_array_equal, params, original)
