"""End-to-end `cftjax train` on a tiny demo config, in subprocesses: run-dir contents and plots, and
exact resume after SIGKILL and after SIGTERM (which must save and exit 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from cftjax import cli
from cftjax.data import synthetic
from tests.run_files import metric_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 20
CHECKPOINT_EVERY = 4
TINY = {
    "train.steps": TOTAL_STEPS, "checkpoint.every_steps": CHECKPOINT_EVERY, "logging.every_steps": 1,
    "logging.progress_bar": "false", "eval.every_steps": 0, "eval.loss_batches": 1,
    "eval.verdict_examples": 2, "eval.batch_size": 2, "eval.max_new_tokens": 8,
    "model.arch.hidden_size": 32, "model.arch.intermediate_size": 64, "model.arch.num_layers": 1,
    "model.arch.num_heads": 2, "model.arch.num_kv_heads": 2, "model.arch.head_dim": 16,
    "data.batch_size": 4, "train.cpu_peak_flops": 1e11,
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("cft_trainer")
  world = root / "world"
  synthetic.write_world(str(world), seed=0, num_train=200, num_heldout=20)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=2",  # a 2-device FSDP mesh
             JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),  # later runs reuse compiled steps
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return {"root": root, "world": str(world), "env": env}


def _command(workspace, run_dir: str) -> list[str]:
  overrides = {**TINY, "train.run_dir": run_dir, "data.world_dir": workspace["world"]}
  return [sys.executable, "-m", "cftjax.cli", "--log_level=WARNING", "train",
          "--config", os.path.join(REPO, "configs", "demo_cft.py")] + [
              f"--config.{k}={v}" for k, v in overrides.items()]


def _start(workspace, run_dir: str) -> subprocess.Popen:
  return subprocess.Popen(_command(workspace, run_dir), cwd=REPO, env=workspace["env"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
  out, err = process.communicate(timeout=300)
  assert process.returncode in (0, -signal.SIGKILL), f"exit {process.returncode}\n{out}\n{err[-5000:]}"
  return process.returncode, out


def _wait_for(condition, process: subprocess.Popen, what: str) -> None:
  deadline = time.time() + 240
  while not condition():
    if process.poll() is not None:
      raise AssertionError(f"trainer exited ({process.returncode}) before {what}:\n"
                           f"{process.stderr.read()[-5000:]}")
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.01)


def _finalized_steps(run_dir: str) -> list[int]:
  directory = os.path.join(run_dir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def _train_rows(run_dir: str) -> dict[int, dict]:
  """The last train metrics row of each step (a resumed run repeats the steps after its checkpoint)."""
  return {row["step"]: row for row in metric_rows(run_dir) if row["split"] == "train"}


def _final_state(run_dir: str) -> list[np.ndarray]:
  path = os.path.join(run_dir, "checkpoints", str(TOTAL_STEPS), "state")
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path)
  leaves = []
  def collect(tree):
    if isinstance(tree, dict):
      for key in sorted(tree):
        collect(tree[key])
    elif isinstance(tree, (list, tuple)):
      for item in tree:
        collect(item)
    else:
      leaves.append(np.asarray(tree))
  collect(restored)
  return leaves


@pytest.fixture(scope="module")
def reference_run(workspace):
  """An uninterrupted run (also the smoke test's subject)."""
  run_dir = str(workspace["root"] / "reference")
  code, out = _finish(_start(workspace, run_dir))
  assert code == 0
  return run_dir, out


def test_run_dir_holds_checkpoints_metrics_events_summary_and_plots(reference_run):
  run_dir, out = reference_run
  assert "before" in out and "after" in out and "verdict_accuracy" in out
  assert _finalized_steps(run_dir) == [TOTAL_STEPS - CHECKPOINT_EVERY, TOTAL_STEPS]  # max_to_keep=2
  for step in _finalized_steps(run_dir):
    items = os.listdir(os.path.join(run_dir, "checkpoints", str(step)))
    assert {"state", "data", "config"} <= set(items)
  with open(os.path.join(run_dir, "config.json")) as f:
    assert json.load(f)["config"]["train"]["steps"] == TOTAL_STEPS
  train_rows = _train_rows(run_dir)
  assert list(train_rows) == list(range(1, TOTAL_STEPS + 1))
  for key in ("loss", "accuracy", "grad_norm", "lr", "tokens_per_s", "step_time_s", "mfu"):
    assert np.isfinite(train_rows[TOTAL_STEPS][key]), key
  assert train_rows[TOTAL_STEPS]["loss"] < train_rows[1]["loss"]
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    eval_steps = [row["step"] for row in map(json.loads, f) if row["split"] == "eval"]
  assert eval_steps == [0, TOTAL_STEPS]
  events = os.listdir(os.path.join(run_dir, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)
  with open(os.path.join(run_dir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["steps"] == TOTAL_STEPS and not summary["preempted"]
  assert set(summary["final_eval"]) >= {"eval_loss", "verdict_accuracy", "verdict_missing_rate"}
  assert os.listdir(os.path.join(run_dir, "best"))  # best verdict_accuracy params

  assert cli.main(["plot", run_dir]) == 0
  plots = os.listdir(os.path.join(run_dir, "plots"))
  assert {"train_loss.png", "train_accuracy.png", "train_lr.png", "train_grad_norm.png",
          "eval_verdict_accuracy.png", "eval_eval_loss.png"} <= set(plots)


def test_resume_after_sigkill_and_sigterm_matches_the_uninterrupted_run(workspace, reference_run):
  reference_dir, _ = reference_run
  run_dir = str(workspace["root"] / "interrupted")

  # 1. SIGKILL as soon as the first checkpoint is finalized (a later save may be cut short).
  process = _start(workspace, run_dir)
  _wait_for(lambda: _finalized_steps(run_dir), process, "the first checkpoint")
  process.send_signal(signal.SIGKILL)
  code, _ = _finish(process)
  assert code == -signal.SIGKILL
  killed_at = _finalized_steps(run_dir)[-1]
  assert killed_at < TOTAL_STEPS

  # 2. Resume, then SIGTERM once it has trained a step: it saves that step and exits 0.
  rows_before = len(metric_rows(run_dir))
  process = _start(workspace, run_dir)
  _wait_for(lambda: any(row["split"] == "train" for row in metric_rows(run_dir)[rows_before:]),
            process, "a step after resuming")
  process.send_signal(signal.SIGTERM)
  code, _ = _finish(process)
  assert code == 0
  with open(os.path.join(run_dir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["preempted"] and summary["start_step"] == killed_at
  assert killed_at < summary["steps"] < TOTAL_STEPS
  assert _finalized_steps(run_dir)[-1] == summary["steps"]

  # 3. Resume to the end: losses and final state equal the uninterrupted run's, bit for bit.
  code, _ = _finish(_start(workspace, run_dir))
  assert code == 0
  reference_rows, rows = _train_rows(reference_dir), _train_rows(run_dir)
  assert list(rows) == list(reference_rows)
  for step, row in rows.items():
    assert (row["loss"], row["grad_norm"], row["lr"]) == (
        reference_rows[step]["loss"], reference_rows[step]["grad_norm"], reference_rows[step]["lr"]), step
  for got, want in zip(_final_state(run_dir), _final_state(reference_dir), strict=True):
    np.testing.assert_array_equal(got, want)


def test_flops_per_token_and_device_peaks():
  from cftjax.models import ModelConfig
  from cftjax.train import run as metrics

  cfg = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=4)
  # Per layer: q 8x8, k and v 8x4 each, o 8x8, MLP 3 x 8x16, two norms of 8; final norm 8; lm_head 8x100.
  matmul_params = 2 * (64 + 32 + 32 + 64 + 3 * 128 + 16) + 8 + 800
  assert metrics.matmul_params(cfg) == matmul_params
  assert metrics.train_flops_per_token(cfg, seq_len=32) == 6 * matmul_params + 12 * 2 * 2 * 4 * 32
  assert metrics.matmul_params(cfg.replace(tie_embeddings=True)) == cfg.replace(tie_embeddings=True).num_params

  class Device:
    def __init__(self, kind):
      self.device_kind = kind
  assert metrics.device_peak_flops(Device("TPU v5 lite")) == 197e12
  assert metrics.device_peak_flops(Device("TPU v5p")) == 459e12
  assert metrics.device_peak_flops(Device("NVIDIA H100 80GB HBM3")) == 989e12
  assert metrics.device_peak_flops(Device("NVIDIA A100-SXM4-40GB")) == 312e12
  assert metrics.device_peak_flops(Device("Quantum Abacus")) is None


def test_an_existing_world_is_used_as_written_and_the_config_says_so(workspace, tmp_path, caplog):
  from cftjax import config as config_lib  # pylint: disable=import-outside-toplevel

  config = config_lib.load_config(os.path.join(REPO, "configs", "demo_cft.py"), [
      ("train.run_dir", str(tmp_path / "run")), ("data.world_dir", workspace["world"]),
      ("data.world.teacher_leading_carry_slip", "0.5")])
  with caplog.at_level("WARNING", logger="cftjax.data.synthetic"):
    synthetic.ensure_world(config)
  assert (config.data.world.num_train, config.data.world.num_heldout) == (200, 20)
  assert config.data.world.teacher_leading_carry_slip == 0.0
  assert "teacher_leading_carry_slip': (0.5, 0.0)" in caplog.text and "num_train" in caplog.text
  assert config.data.train_path == os.path.join(workspace["world"], "train.jsonl")

  fresh = config_lib.load_config(os.path.join(REPO, "configs", "demo_cft.py"), [
      ("train.run_dir", str(tmp_path / "run")), ("data.world.num_train", "40"),
      ("data.world.num_heldout", "8"), ("data.world.teacher_leading_carry_slip", "0.5")])
  synthetic.ensure_world(fresh)
  assert fresh.data.world_dir == str(tmp_path / "run" / "world")
  assert synthetic.written_world_params(fresh.data.world_dir)["teacher_leading_carry_slip"] == 0.5
