"""A run directory stays safe to reuse: the checkpoint selector (RUN_DIR, :best, :latest, :step=N) and
the best-params tie rule, the final eval of a rerun, config.json written with the first save, the
run-dir lock, SIGINT / SIGTERM to real trainer processes, NaN-safe saves and valid-JSON metrics, a
damaged newest checkpoint, and GRPO's refused group of one and counted zero-variance skips."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from cftjax import cli
from cftjax import config as config_lib
from cftjax import launch
from cftjax.data import synthetic
from cftjax.models import checkpoint_io
from cftjax.train import checkpoint as ckpt
from cftjax.train import grpo, run_lock
from cftjax.train import run as run_lib
from tests.run_files import metric_rows
from tests.test_checkpoint import _abstract, _assert_trees_equal, _state
from tests.test_grpo_run import smoke_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo_cft.py")
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TINY = {
    "checkpoint.every_steps": 2, "logging.every_steps": 1, "logging.progress_bar": "false",
    "logging.tensorboard": "false", "eval.loss_batches": 1, "eval.batch_size": 8,
    "eval.every_steps": 0, "eval.verdict_examples": 0, "checkpoint.best_metric": "eval_loss",
    "checkpoint.best_mode": "min", "model.arch.hidden_size": 32, "model.arch.intermediate_size": 64,
    "model.arch.num_layers": 1, "model.arch.num_heads": 2, "model.arch.num_kv_heads": 2,
    "model.arch.head_dim": 16, "data.batch_size": 8, "data.packing": "false",
    "train.cpu_peak_flops": 1e11, "optim.warmup_ratio": 0.0,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("run_safety") / "world")
  synthetic.write_world(path, seed=0, num_train=40, num_heldout=8)
  return path


def train_args(world: str, run_dir: str, **overrides) -> list[str]:
  values = TINY | {"train.run_dir": run_dir, "data.world_dir": world} | overrides
  return ["train", "--config", DEMO_CONFIG] + [f"--config.{k}={v}" for k, v in values.items()]


def train(capsys, world: str, run_dir: str, **overrides) -> tuple[int, str, str]:
  """(exit code, stdout, stderr) of an in-process `cftjax train`."""
  code = cli.main(["--log_level=WARNING"] + train_args(world, run_dir, **overrides))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def start(world: str, run_dir: str, cache: str, **overrides) -> subprocess.Popen:
  """`cftjax train` in a subprocess (real signals), sharing a compilation cache."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=1 " + FAST_COMPILE_FLAGS,
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  command = [sys.executable, "-m", "cftjax.cli", "--log_level=WARNING"] + train_args(world, run_dir,
                                                                                    **overrides)
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
  deadline = time.time() + 600  # a loaded CI host may take minutes to start and compile
  while not condition():
    if process.poll() is not None:
      raise AssertionError(f"trainer exited ({process.returncode}) before {what}:\n"
                           f"{process.stderr.read()[-5000:]}")
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.01)


def train_steps_logged(run_dir: str) -> list[int]:
  return [row["step"] for row in metric_rows(run_dir) if row["split"] == "train"]


def saved_steps(run_dir: str) -> list[int]:
  return checkpoint_io.run_steps(run_dir)[0]


def summary_of(run_dir: str) -> dict:
  with open(os.path.join(run_dir, "summary.json")) as f:
    return json.load(f)


# ------------------------------------------------------------------------------------------------
# Item 3: which params a run directory gives, and the final eval.


def test_a_tie_with_step_0_goes_to_the_later_step(tmp_path):
  """The untrained step 0 stays best only when every later eval is worse; a NaN metric never wins."""
  run = ckpt.RunCheckpoints(str(tmp_path), best_metric="acc", best_mode="max", async_save=False)
  assert run.maybe_save_best(0, _state(0).params, {"acc": 0.5})
  assert run.maybe_save_best(4, _state(4).params, {"acc": 0.5})
  assert not run.maybe_save_best(6, _state(6).params, {"acc": float("nan")})
  assert not run.maybe_save_best(8, _state(8).params, {"acc": 0.4})
  assert run.best_step() == 4
  run.close()
  assert sorted(os.listdir(tmp_path / "best")) == ["4"]


def test_the_selector_picks_best_only_when_it_beats_step_0_and_says_which(tmp_path, caplog):
  run_dir = str(tmp_path)
  run = ckpt.RunCheckpoints(run_dir, max_to_keep=3, best_metric="loss", best_mode="min", async_save=False)
  run.maybe_save_best(0, _state(0).params, {"loss": 1.0})  # nothing later beat the untrained model
  for step in (2, 4):
    run.save(step, _state(step), {}, {})
  assert not run.maybe_save_best(4, _state(4).params, {"loss": 1.5})
  run.close()
  target = _abstract(_state()).params
  with caplog.at_level(logging.INFO, logger="cftjax.models.checkpoint_io"):
    step, params = checkpoint_io.load_run_params(run_dir, target)
  assert step == 4 and "using the latest step 4 (best/ is step 0" in caplog.text
  _assert_trees_equal(params, _state(4).params)
  for spec, want in ((f"{run_dir}:best", 0), (f"{run_dir}:latest", 4), (f"{run_dir}:step=2", 2),
                     (f"{run_dir}:step=0", 0)):
    step, params = checkpoint_io.load_run_params(spec, target)
    assert step == want, spec
    _assert_trees_equal(params, _state(want).params)

  run = ckpt.RunCheckpoints(run_dir, max_to_keep=3, best_metric="loss", best_mode="min", async_save=False)
  assert run.maybe_save_best(4, _state(4).params, {"loss": 0.5})
  run.close()
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="cftjax.models.checkpoint_io"):
    assert checkpoint_io.load_run_params(run_dir, target)[0] == 4
  assert "using best/ (step 4)" in caplog.text
  with pytest.raises(FileNotFoundError, match=r":step=3: no step 3 in .*\(saved steps \[2, 4\], best: step 4\)"):
    checkpoint_io.load_run_params(f"{run_dir}:step=3", target)


def test_init_from_run_takes_the_selected_params_not_the_untrained_best(tmp_path):
  """model.init_from_run = RUN_DIR gives the latest step when best/ holds only step 0; a selector in
  model.init_from_run picks another step."""
  run_dir = str(tmp_path / "cft")
  run = ckpt.RunCheckpoints(run_dir, best_metric="acc", async_save=False)
  run.maybe_save_best(0, _state(0).params, {"acc": 0.5})
  run.save(3, _state(3), {}, {})
  run.close()
  config = config_lib.base_config()
  for spec, want in ((run_dir, 3), (f"{run_dir}:best", 0)):
    config.model.init_from_run = spec
    assert run_lib.init_run_dir(config) == run_dir
    step, params = checkpoint_io.load_run_params(config.model.init_from_run, _abstract(_state()).params)
    assert step == want
    _assert_trees_equal(params, _state(want).params)


def test_a_rerun_at_the_last_step_runs_the_final_eval_that_did_not_run(world, tmp_path, capsys):
  """A run stopped after its final checkpoint but before its final eval (here: a first call with
  nothing to evaluate) is finished by the rerun: "steps 4 -> 4" runs the final eval, saves best and records
  best_step; a second rerun reuses that final eval."""
  run_dir = str(tmp_path / "run")
  code, _, err = train(capsys, world, run_dir, **{"train.steps": 4, "eval.loss_batches": 0})
  assert code == 0, err
  first = summary_of(run_dir)
  assert "final_eval" not in first and first["best_step"] is None
  code, out, err = train(capsys, world, run_dir, **{"train.steps": 4})
  assert code == 0, err
  assert "steps 4 -> 4 of 4" in out
  summary = summary_of(run_dir)
  assert set(summary["final_eval"]) == {"eval_loss", "eval_accuracy"}
  assert summary["finished"] and summary["best_step"] == 4
  assert [r["step"] for r in metric_rows(run_dir) if r["split"] == "eval"] == [4]
  code, out, err = train(capsys, world, run_dir, **{"train.steps": 4})
  assert code == 0 and summary_of(run_dir)["final_eval"] == summary["final_eval"]
  assert [r["step"] for r in metric_rows(run_dir) if r["split"] == "eval"] == [4]  # not evaluated again


def test_generate_reads_the_step_a_selector_names(world, tmp_path, capsys):
  run_dir = str(tmp_path / "run")
  code, out, err = train(capsys, world, run_dir, **{"train.steps": 4})
  assert code == 0, err
  outputs = {}
  for spec in (run_dir, f"{run_dir}:latest", f"{run_dir}:step=2", f"{run_dir}:best"):
    assert cli.main(["--log_level=ERROR", "generate", "--ckpt", spec, "--prompt", "1+2",
                     "--max-new-tokens", "6"]) == 0
    outputs[spec] = capsys.readouterr().out
  assert outputs[run_dir] == outputs[f"{run_dir}:latest"] == outputs[f"{run_dir}:best"]  # best = step 4
  code = cli.main(["--log_level=ERROR", "generate", "--ckpt", f"{run_dir}:step=3", "--prompt", "x"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 1 and err[-1].startswith(f"cftjax: error: {run_dir}:step=3: no step 3 in {run_dir} "
                                          "(saved steps [2, 4], best: step 4)")


# ------------------------------------------------------------------------------------------------
# Item 4: config.json is written with the first save.


def test_a_failed_start_leaves_no_config_that_blocks_the_corrected_command(world, tmp_path, capsys):
  run_dir = str(tmp_path / "run")
  missing = str(tmp_path / "no_such_rows.jsonl")
  code, _, err = train(capsys, world, run_dir, **{"train.steps": 2, "data.train_path": missing,
                                                  "model.arch.hidden_size": 16})
  assert code == 1 and "no_such_rows.jsonl" in err.strip().splitlines()[-1]
  assert not os.path.exists(os.path.join(run_dir, "config.json"))
  code, _, err = train(capsys, world, run_dir, **{"train.steps": 2})  # other data path and width
  assert code == 0, err
  with open(os.path.join(run_dir, "config.json")) as f:
    assert json.load(f)["config"]["model"]["arch"]["hidden_size"] == 32


def test_a_failed_restore_does_not_rewrite_config_json(world, tmp_path, capsys):
  run_dir = str(tmp_path / "run")
  code, _, err = train(capsys, world, run_dir, **{"train.steps": 2})
  assert code == 0, err
  config_path = os.path.join(run_dir, "config.json")
  with open(config_path, "rb") as f:
    before = f.read()
  os.remove(os.path.join(run_dir, "checkpoints", "2", "state", "_METADATA"))  # damaged, the only step
  code, _, err = train(capsys, world, run_dir, **{"train.steps": 4, "optim.lr": 1e-4})
  assert code == 1 and "_METADATA is missing" in err.strip().splitlines()[-1]
  with open(config_path, "rb") as f:
    assert f.read() == before


# ------------------------------------------------------------------------------------------------
# Item 5: one writer per run directory.


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_replaced(world, tmp_path, capsys):
  run_dir = str(tmp_path / "run")
  first = start(world, run_dir, str(tmp_path / "cache"), **{"train.steps": 400,
                                                             "checkpoint.every_steps": 1000})
  try:
    wait_for(lambda: train_steps_logged(run_dir), first, "the first run's first step")
    with open(os.path.join(run_dir, run_lock.LOCK_FILE)) as f:
      holder = json.load(f)
    assert (holder["pid"], holder["host"]) == (first.pid, socket.gethostname())
    rows = len(metric_rows(run_dir))
    code, _, err = train(capsys, world, run_dir, **{"train.steps": 400, "checkpoint.every_steps": 1000})
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        f"cftjax: error: {run_dir} is in use by another cftjax train (pid {first.pid} on host "
        f"{socket.gethostname()}, since {holder['since']}); wait for it to finish or choose another "
        f"train.run_dir; if that run is dead, delete {os.path.join(run_dir, run_lock.LOCK_FILE)}")
    assert all(row["step"] > 0 for row in metric_rows(run_dir)[rows:])  # nothing written by the second
    first.send_signal(signal.SIGKILL)  # dies holding the lock
    first.communicate(timeout=60)
  finally:
    if first.poll() is None:
      first.kill()
  assert os.path.exists(os.path.join(run_dir, run_lock.LOCK_FILE))
  code, _, err = train(capsys, world, run_dir, **{"train.steps": 2})
  assert code == 0, err
  assert f"removing a stale lock of pid {first.pid} (no longer running)" in err
  assert not os.path.exists(os.path.join(run_dir, run_lock.LOCK_FILE))  # released at the end


def test_the_lock_is_released_when_the_run_fails(world, tmp_path, capsys):
  run_dir = str(tmp_path / "run")
  code, _, _ = train(capsys, world, run_dir, **{"train.steps": 2, "data.train_path": "/nonexistent.jsonl"})
  assert code == 1 and not os.path.exists(os.path.join(run_dir, run_lock.LOCK_FILE))


# ------------------------------------------------------------------------------------------------
# Item 6: SIGINT saves like SIGTERM; a second SIGINT exits at once; SIGTERM after the loop.


def test_sigint_saves_writes_the_summary_and_exits_130_then_the_run_resumes(world, tmp_path, capsys):
  run_dir = str(tmp_path / "run")
  process = start(world, run_dir, str(tmp_path / "cache"), **{"train.steps": 400,
                                                              "checkpoint.every_steps": 1000})
  wait_for(lambda: len(train_steps_logged(run_dir)) >= 3, process, "three steps")
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "SIGINT received: saving a checkpoint" in err
  summary = summary_of(run_dir)
  assert summary["preempted"] and summary["signal"] == "SIGINT" and not summary["finished"]
  assert saved_steps(run_dir) == [summary["steps"]] and summary["steps"] >= 3
  assert not os.path.exists(os.path.join(run_dir, run_lock.LOCK_FILE))
  code, out, err = train(capsys, world, run_dir, **{"train.steps": summary["steps"] + 1,
                                                    "checkpoint.every_steps": 1000})
  assert code == 0, err
  assert f"steps {summary['steps']} -> {summary['steps'] + 1}" in out


def test_a_second_sigint_exits_at_once(world, tmp_path):
  """The second Ctrl-C is sent once the first has been handled (its warning is on stderr), while the
  run is finishing its step and saving."""
  run_dir = str(tmp_path / "run")
  process = start(world, run_dir, str(tmp_path / "cache"), **{"train.steps": 400})
  lines: list[str] = []
  reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
  reader.start()
  wait_for(lambda: len(train_steps_logged(run_dir)) >= 1, process, "a step")
  process.send_signal(signal.SIGINT)
  wait_for(lambda: any("SIGINT received" in line for line in lines), process, "the first SIGINT")
  process.send_signal(signal.SIGINT)
  process.wait(timeout=120)
  reader.join(timeout=10)
  assert process.returncode == 130, "".join(lines)[-3000:]
  assert lines[-1].strip() == "cftjax: interrupted (Ctrl-C); exit code 130", "".join(lines)[-3000:]
  assert "Traceback" not in "".join(lines)
  assert not os.path.exists(os.path.join(run_dir, run_lock.LOCK_FILE))


def test_sigterm_during_the_final_eval_still_writes_the_summary(world, tmp_path):
  run_dir = str(tmp_path / "run")
  steps = 3
  process = start(world, run_dir, str(tmp_path / "cache"), **{
      "train.steps": steps, "eval.verdict_examples": 16, "eval.batch_size": 8,
      "eval.max_new_tokens": 80, "eval.at_start": "false"})
  wait_for(lambda: steps in train_steps_logged(run_dir), process, "the last step")
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=180)
  assert process.returncode == 0, err[-3000:]
  summary = summary_of(run_dir)
  assert summary["steps"] == steps and summary["signal"] == "SIGTERM"
  assert saved_steps(run_dir)[-1] == steps
  # Either the eval had started (it finishes) or not (the run is left for a rerun to evaluate).
  assert summary["finished"] == ("final_eval" in summary) == (not summary["preempted"])


# ------------------------------------------------------------------------------------------------
# Item 12: NaN-safe checkpoints, valid JSON metrics, a damaged newest checkpoint.


def strict_rows(run_dir: str) -> list[dict]:
  """metrics.jsonl parsed as strict JSON (a bare NaN / Infinity raises)."""
  def refuse(constant):
    raise ValueError(f"not JSON: {constant}")
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


@pytest.mark.parametrize("lr,saved,reason", [
    # 1e30: step 1's update is finite (params ~1e30), later gradients overflow and are skipped.
    (1e30, [1], "the last 1 update(s) were skipped for NaN/inf"),
    # 1e39 is inf in float32: step 1's update makes the params inf although its gradients were finite.
    (1e39, [], "the params hold NaN/inf"),
])
def test_no_checkpoint_is_saved_while_updates_are_skipped_or_params_are_not_finite(
    world, tmp_path, capsys, lr, saved, reason):
  run_dir = str(tmp_path / "run")
  code, _, err = train(capsys, world, run_dir, **{
      "train.steps": 20, "optim.lr": lr, "optim.schedule": "constant", "checkpoint.every_steps": 1,
      "checkpoint.max_to_keep": 2, "train.max_consecutive_nonfinite": 4, "data.batch_size": 8})
  assert code == 1 and "consecutive updates" in err.strip().splitlines()[-1]
  assert saved_steps(run_dir) == saved  # rotation kept the step from before the NaNs
  assert reason in err
  rows = [r for r in strict_rows(run_dir) if r["split"] == "train"]
  assert any(r["grad_norm"] is None or r["loss"] is None for r in rows)  # null, not a bare NaN


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(world, tmp_path, capsys):
  run_dir = str(tmp_path / "run")
  code, _, err = train(capsys, world, run_dir, **{"train.steps": 4, "checkpoint.max_to_keep": 3})
  assert code == 0, err
  data_dir = os.path.join(run_dir, "checkpoints", "4", "state", "ocdbt.process_0", "d")
  for name in os.listdir(data_dir):  # the array bytes of step 4 are overwritten with garbage
    with open(os.path.join(data_dir, name), "wb") as f:
      f.write(os.urandom(64))
  code, out, err = train(capsys, world, run_dir, **{"train.steps": 6, "checkpoint.max_to_keep": 3})
  assert code == 0, err
  assert "Traceback" not in err and "TensorStore" not in err
  warnings = [line for line in err.splitlines() if "previous complete checkpoint" in line]
  assert len(warnings) == 1 and "checkpoints/4: unreadable train state" in warnings[0]
  assert "steps 2 -> 6" in out
  assert saved_steps(run_dir) == [2, 4, 6]  # step 4 trained and saved again
  assert [n.split("-")[0] for n in os.listdir(os.path.join(run_dir, ckpt.CORRUPT_DIR))] == ["4"]


# ------------------------------------------------------------------------------------------------
# Item 13: GRPO groups.


def test_a_group_of_one_is_refused_naming_the_key(tmp_path):
  config = smoke_config(str(tmp_path / "world"), str(tmp_path / "run"), steps=1)
  config.rl.group_size = 1
  with pytest.raises(config_lib.ConfigError, match=r"^rl.group_size=1: a GRPO advantage .* set "
                                                   r"rl.group_size >= 2"):
    grpo._check_config(config, prompts_per_host=4)  # pylint: disable=protected-access


def test_steps_without_reward_variance_are_counted_as_skipped_updates(tmp_path):
  """Math prompts and a 6-token random policy: every reward is 0, so dynamic sampling leaves no group
  and each step's updates are skipped, counted per step and in the summary."""
  world = str(tmp_path / "world")
  synthetic.write_world(world, num_train=40, num_heldout=8)
  config = smoke_config(world, str(tmp_path / "run"), steps=2)
  config.data.sources = ({"path": os.path.join(world, "rl_math_train.jsonl"), "task": "math",
                          "template": "math_cot", "name": "math"},)
  config.data.eval_path = ""
  config.rl.kl_coef = 0.0
  config.rl.overlong_buffer = 0
  config.rl.dynamic_sampling = True
  config.rl.max_draws = 1
  config.rl.mini_batches = 2
  summary = launch.train(config)
  rows = [r for r in metric_rows(config.train.run_dir) if r["split"] == "train"]
  assert [r["reward_std"] for r in rows] == [0.0, 0.0]
  assert [r["skipped_updates"] for r in rows] == [2.0, 4.0]
  assert summary["skipped_updates"] == 4
