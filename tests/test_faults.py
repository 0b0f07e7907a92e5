"""Hard failures: a NaN / inf loss or gradient skips the update inside the jitted CFT and GRPO steps
(params and optimizer state unchanged, counted) and K in a row stop `cftjax train` with a one-line
error; SIGKILL at random moments, also while an async checkpoint is being written, then resume:
the losses and final state equal an uninterrupted run's and a partial checkpoint is never restored."""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from cftjax import config as config_lib
from cftjax import parallel
from cftjax.data import synthetic
from cftjax.models import ModelConfig
from cftjax.train.cft import make_cft_step
from cftjax.train.grpo import make_grpo_step
from cftjax.train.state import create_train_state
from tests.run_files import metric_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                  num_kv_heads=1, head_dim=8)
ROWS, SEQ = 4, 8
# Subprocess trainers: less LLVM optimisation compiles the tiny steps several times faster.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# ------------------------------------------------------------------------------------------------
# Non-finite updates are skipped inside the jitted steps.


def _mesh():
  return parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[:2])


def _tokens(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (ROWS, SEQ + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (ROWS, SEQ)).copy(),
          "segment_ids": np.ones((ROWS, SEQ), np.int32)}


def _cft_batch(seed: int) -> dict[str, np.ndarray]:
  return _tokens(seed) | {"loss_mask": np.ones((ROWS, SEQ), np.float32)}


def _grpo_batch(seed: int) -> dict[str, np.ndarray]:
  mask = np.zeros((ROWS, SEQ), np.float32)
  mask[:, 3:] = 1.0
  return _tokens(seed) | {"completion_mask": mask, "old_logp": np.full((ROWS, SEQ), -3.0, np.float32),
                          "advantages": np.array([1.0, -1.0, 0.5, -0.5], np.float32)[:, None] * mask,
                          "token_weights": mask.copy(), "refined_mask": np.zeros_like(mask)}


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@functools.cache
def _jitted_step(kind: str):
  """(mesh, optimizer, jitted step, batch maker) of `kind`, compiled once per module."""
  mesh, tx = _mesh(), optax.adamw(1e-2)
  with parallel.use_mesh(mesh):
    if kind == "cft":
      return mesh, tx, make_cft_step(CFG, tx, chunk_size=16), _cft_batch
    return mesh, tx, make_grpo_step(CFG, tx, rl=config_lib.base_config().rl, chunk_size=16), _grpo_batch


@pytest.mark.parametrize("kind,poison", [
    ("cft", lambda b: b["loss_mask"].__setitem__((2, 5), np.nan)),  # NaN loss and gradients
    ("cft", lambda b: b["loss_mask"].__setitem__((1, 0), np.inf)),  # inf loss
    ("grpo", lambda b: b["advantages"].__setitem__(3, np.inf)),  # inf advantage
])
def test_a_non_finite_batch_skips_its_update_and_training_goes_on(kind, poison):
  mesh, tx, step, make_batch = _jitted_step(kind)
  with parallel.use_mesh(mesh):
    _check_non_finite_batch(tx, step, make_batch, poison)


def _check_non_finite_batch(tx, step, make_batch, poison):
  state = create_train_state(CFG, tx, jax.random.key(0))
  state, metrics = step(state, parallel.host_local_to_global(make_batch(0)))
  assert float(metrics["update_skipped"]) == 0.0 and int(state.step) == 1
  before = _host((state.params, state.opt_state))

  bad = make_batch(1)
  poison(bad)
  state, metrics = step(state, parallel.host_local_to_global(bad))
  assert float(metrics["update_skipped"]) == 1.0
  assert not (np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"])))
  assert int(state.step) == 2  # the step counter counts batches consumed
  _assert_trees_equal(_host((state.params, state.opt_state)), before)  # Adam count included

  state, metrics = step(state, parallel.host_local_to_global(make_batch(2)))
  assert float(metrics["update_skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
  after = _host(state.params)
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(before[0])))


# ------------------------------------------------------------------------------------------------
# Trainer level: skipped updates are counted; K in a row stop the run with a one-line error.

TINY_TRAIN = {
    "checkpoint.every_steps": 2, "logging.every_steps": 1, "logging.progress_bar": "false",
    "logging.tensorboard": "false", "eval.loss_batches": 0, "eval.verdict_examples": 0,
    "checkpoint.best_metric": "", "model.arch.hidden_size": 32, "model.arch.intermediate_size": 64,
    "model.arch.num_layers": 1, "model.arch.num_heads": 2, "model.arch.num_kv_heads": 2,
    "model.arch.head_dim": 16, "data.batch_size": 4, "data.packing": "false",
    "train.cpu_peak_flops": 1e11,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("faults") / "world")
  synthetic.write_world(path, seed=0, num_train=40, num_heldout=8)
  return path


def _train_args(world: str, run_dir: str, **overrides) -> list[str]:
  values = TINY_TRAIN | {"train.run_dir": run_dir, "data.world_dir": world} | overrides
  return ["train", "--config", os.path.join(REPO, "configs", "demo_cft.py")] + [
      f"--config.{k}={v}" for k, v in values.items()]


def test_consecutive_non_finite_updates_are_counted_then_stop_the_run(world, tmp_path, capsys):
  """lr 1e30: the first update is finite but sends the params to ~1e30, so every later gradient
  overflows (the step is not mocked: the real optimizer diverges)."""
  from cftjax import cli  # pylint: disable=import-outside-toplevel

  run_dir = str(tmp_path / "run")
  code = cli.main(["--log_level=ERROR"] + _train_args(
      world, run_dir, **{"train.steps": 20, "data.batch_size": 8, "optim.lr": 1e30,
                         "optim.warmup_ratio": 0.0, "optim.schedule": "constant",
                         "train.max_consecutive_nonfinite": 3}))
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 1
  assert err == ["cftjax: error: step 4: the loss or gradients were NaN/inf in 3 consecutive updates "
                 "(train.max_consecutive_nonfinite=3), so the run stopped; lower optim.lr, check the "
                 "data, or resume from the last checkpoint"]
  rows = [row for row in metric_rows(run_dir) if row["split"] == "train"]
  assert [(r["step"], r["update_skipped"], r["skipped_updates"]) for r in rows] == [
      (1, 0.0, 0.0), (2, 1.0, 1.0), (3, 1.0, 2.0)]
  assert np.isfinite(rows[0]["grad_norm"]) and rows[1]["grad_norm"] is None  # NaN / inf: JSON null


# ------------------------------------------------------------------------------------------------
# SIGKILL at random moments, during steps and during async checkpoint writes.

KILL_STEPS = 16
KILL_MARGIN = 4  # steps left to run when a random kill is armed


def _start(world: str, run_dir: str, cache: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=2 " + FAST_COMPILE_FLAGS,
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  command = [sys.executable, "-m", "cftjax.cli", "--log_level=INFO"] + _train_args(
      world, run_dir, **{"train.steps": KILL_STEPS, "checkpoint.every_steps": 2,
                         "checkpoint.max_to_keep": 3})
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def _checkpoint_entries(run_dir: str) -> tuple[list[int], list[str]]:
  """(finalized steps, unfinished Orbax temporary dirs) under RUN_DIR/checkpoints."""
  directory = os.path.join(run_dir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return (sorted(int(n) for n in names if n.isdigit()),
          [n for n in names if ".orbax-checkpoint-tmp" in n])


def _kill_when(process: subprocess.Popen, condition, what: str) -> str:
  """SIGKILLs `process` as soon as condition() holds; returns its stderr."""
  deadline = time.time() + 240
  while not condition():
    assert process.poll() is None, f"trainer exited ({process.returncode}) before {what}:\n" + \
        process.stderr.read()[-5000:]
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.002)
  process.send_signal(signal.SIGKILL)
  _, err = process.communicate(timeout=60)
  return err


def _resumed_from(log: str) -> int | None:
  lines = [line for line in log.splitlines() if "resumed" in line and " from step " in line]
  return int(lines[0].rsplit(" ", 1)[1]) if lines else None


def _final_state(run_dir: str) -> list[np.ndarray]:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  path = os.path.join(run_dir, "checkpoints", str(KILL_STEPS), "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return jax.tree.leaves(checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy)))


def test_sigkill_at_random_moments_then_resume_reproduces_the_uninterrupted_run(world, tmp_path):
  cache = str(tmp_path / "jax_cache")
  reference_dir, run_dir = str(tmp_path / "reference"), str(tmp_path / "killed")
  process = _start(world, reference_dir, cache)
  assert process.wait(timeout=300) == 0, process.stderr.read()[-5000:]

  # 1. Killed while an async checkpoint is being written (its Orbax temporary dir exists).
  err = _kill_when(_start(world, run_dir, cache), lambda: _checkpoint_entries(run_dir)[1],
                   "a checkpoint write")
  assert _checkpoint_entries(run_dir)[1], "the kill should leave a partial (temporary) checkpoint"
  # 2.-4. Killed at random moments: after 2-6 more steps (metrics rows) plus a random fraction of a
  # step, so mid-step, mid-save or in between; each resume starts from the newest finalized step. At
  # least KILL_MARGIN steps stay to run when the kill is armed, so the trainer cannot finish first.
  rng, starts = random.Random(0), []
  for _ in range(3):
    expected_start = (_checkpoint_entries(run_dir)[0] or [0])[-1]
    more_steps = min(rng.randint(2, 6), KILL_STEPS - expected_start - KILL_MARGIN)
    if more_steps < 1:
      break
    rows_target = len(metric_rows(run_dir)) + more_steps
    delay, reached = rng.uniform(0.0, 0.2), []

    def reached_then_waited():
      if not reached and len(metric_rows(run_dir)) >= rows_target:
        reached.append(time.time())
      return bool(reached) and time.time() - reached[0] >= delay

    err = _kill_when(_start(world, run_dir, cache), reached_then_waited, "more steps")
    assert (_resumed_from(err) or 0) == expected_start, err[-3000:]
    starts.append(expected_start)
  # 5. Resume to the end.
  expected_start = (_checkpoint_entries(run_dir)[0] or [0])[-1]
  assert any(starts + [expected_start]), "no kill landed after a finalized checkpoint"
  process = _start(world, run_dir, cache)
  _, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-5000:]
  assert _resumed_from(err) == expected_start

  reference = {r["step"]: r for r in metric_rows(reference_dir) if r["split"] == "train"}
  resumed = {r["step"]: r for r in metric_rows(run_dir) if r["split"] == "train"}  # last row per step
  assert sorted(resumed) == sorted(reference) == list(range(1, KILL_STEPS + 1))
  for step, row in reference.items():
    assert (resumed[step]["loss"], resumed[step]["grad_norm"]) == (row["loss"], row["grad_norm"]), step
  for got, want in zip(_final_state(run_dir), _final_state(reference_dir), strict=True):
    np.testing.assert_array_equal(got, want)
