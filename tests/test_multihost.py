"""Multi-host training with real JAX processes (2 processes x 2 CPU devices, gloo on 127.0.0.1) through
`python -m cftjax.cli train`: CFT killed after a checkpoint and resumed equals a 1-process x 4-device
run, each process reads only its data shard and process 0 alone writes metrics; a GRPO smoke run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cftjax.data import synthetic
from tests.served import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 10
CHECKPOINT_EVERY = 2
GLOBAL_BATCH = 8  # = the training rows: every global batch holds each row once (see `cft_run`)
CFT_OVERRIDES = {
    "train.steps": TOTAL_STEPS, "checkpoint.every_steps": CHECKPOINT_EVERY, "logging.every_steps": 1,
    "logging.progress_bar": "false", "logging.tensorboard": "false", "eval.loss_batches": 0,
    "eval.verdict_examples": 0, "checkpoint.best_metric": "", "model.arch.hidden_size": 32,
    "model.arch.intermediate_size": 64, "model.arch.num_layers": 1, "model.arch.num_heads": 2,
    "model.arch.num_kv_heads": 2, "model.arch.head_dim": 16, "data.batch_size": GLOBAL_BATCH,
    "data.packing": "false", "train.cpu_peak_flops": 1e11, "mesh.fsdp": 4,
}
TIMEOUT_S = 300
# Less LLVM optimisation: the tiny steps compile several times faster (the same flags in every run).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  world = str(root / "world")
  paths = synthetic.write_world(world, seed=0, num_train=40, num_heldout=8)
  with open(paths["train"]) as f:
    rows = f.readlines()[:GLOBAL_BATCH]
  train_path = str(root / "train_rows.jsonl")
  with open(train_path, "w") as f:
    f.writelines(rows)
  return {"root": root, "world": world, "train_path": train_path,
          "cache": str(root / "jax_cache")}


def _launch(workspace, args: list[str], processes: int, devices: int) -> list[subprocess.Popen]:
  """`python -m cftjax.cli ARGS` as `processes` JAX processes with `devices` CPU devices each."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}",
             JAX_COMPILATION_CACHE_DIR=workspace["cache"], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "CFTJAX_DISTRIBUTED"):
    env.pop(key, None)
  if processes > 1:
    env |= {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": str(processes)}
  command = [sys.executable, "-m", "cftjax.cli", "--log_level=WARNING"] + args
  return [subprocess.Popen(command, cwd=REPO, env=env | {"JAX_PROCESS_ID": str(i)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(processes)]


def _wait(processes: list[subprocess.Popen]) -> list[str]:
  try:
    outputs = [p.communicate(timeout=TIMEOUT_S) for p in processes]
  finally:
    for p in processes:
      p.kill()
  for i, (p, (out, err)) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}\n{out}\n{err[-6000:]}"
  return [out for out, _ in outputs]


def _cft_args(workspace, run_dir: str) -> list[str]:
  overrides = CFT_OVERRIDES | {"train.run_dir": run_dir, "data.world_dir": workspace["world"],
                               "data.train_path": workspace["train_path"]}
  return ["train", "--config", os.path.join(REPO, "configs", "demo_cft.py")] + [
      f"--config.{k}={v}" for k, v in overrides.items()]


def _train_rows(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [row for row in map(json.loads, f) if row["split"] == "train"]


def _finalized_steps(run_dir: str) -> list[int]:
  directory = os.path.join(run_dir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def _final_params(run_dir: str) -> dict:
  """The params of the last checkpoint as numpy (restored without the saving run's devices)."""
  path = os.path.join(run_dir, "checkpoints", str(TOTAL_STEPS), "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))["params"]


@pytest.fixture(scope="module")
def one_process_run(workspace):
  """1 process x 4 devices, uninterrupted: the reference trajectory."""
  run_dir = str(workspace["root"] / "one_process")
  _wait(_launch(workspace, _cft_args(workspace, run_dir), processes=1, devices=4))
  return run_dir


def test_cft_on_two_processes_killed_and_resumed_equals_one_process(workspace, one_process_run):
  """Every global batch holds all 8 training rows (1 process: an epoch of its shuffled rows; 2
  processes: each host's epoch of its 4-row shard), so both runs see the same data in another
  row order; a host reading the other's or all rows would change the losses."""
  run_dir = str(workspace["root"] / "two_processes")
  processes = _launch(workspace, _cft_args(workspace, run_dir), processes=2, devices=2)
  deadline = time.time() + TIMEOUT_S
  while not _finalized_steps(run_dir):
    assert all(p.poll() is None for p in processes), "a process exited before the first checkpoint:\n" + \
        "\n".join(p.stderr.read()[-4000:] for p in processes)
    assert time.time() < deadline, "no checkpoint written in time"
    time.sleep(0.01)
  for p in processes:
    p.send_signal(signal.SIGKILL)
  for p in processes:
    p.wait()
  killed_at = _finalized_steps(run_dir)[-1]
  assert killed_at < TOTAL_STEPS, "the run finished before it could be killed"
  first_segment = [row["step"] for row in _train_rows(run_dir)]
  assert first_segment == list(range(1, len(first_segment) + 1))  # process 0 alone writes rows

  _wait(_launch(workspace, _cft_args(workspace, run_dir), processes=2, devices=2))
  with open(os.path.join(run_dir, "summary.json")) as f:
    summary = json.load(f)
  assert (summary["start_step"], summary["steps"]) == (killed_at, TOTAL_STEPS)
  data_states = os.listdir(os.path.join(run_dir, "checkpoints", str(TOTAL_STEPS), "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_states)  # each host's position

  reference = {row["step"]: row for row in _train_rows(one_process_run)}
  resumed = {row["step"]: row for row in _train_rows(run_dir)}  # the last row of each step
  assert sorted(resumed) == sorted(reference) == list(range(1, TOTAL_STEPS + 1))
  for step in reference:
    for key in ("loss", "grad_norm", "accuracy", "tokens"):
      np.testing.assert_allclose(resumed[step][key], reference[step][key], rtol=2e-5,
                                 err_msg=f"step {step} {key}")
  assert reference[TOTAL_STEPS]["loss"] < reference[1]["loss"]
  got, want = _final_params(run_dir), _final_params(one_process_run)
  for (path, x), y in zip(_flat(got), (v for _, v in _flat(want)), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=path)


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    for key in sorted(tree):
      yield from _flat(tree[key], f"{prefix}/{key}")
  else:
    yield prefix, np.asarray(tree)


_GRPO_CONFIG = textwrap.dedent("""
    from tests.test_grpo_run import smoke_config

    def get_config(world):
      c = smoke_config(world, run_dir="", steps=2)  # the one-process smoke run's tiny model and data
      c.rl.kl_coef = 0.0
      c.data.eval_path = ""  # no held-out eval: this run checks the collective rollout + update
      c.mesh.data, c.mesh.fsdp = 1, 4  # 2 processes x 2 devices
      c.checkpoint.async_save = True
      return c
""")


def test_grpo_smoke_run_on_two_processes(workspace):
  config_file = workspace["root"] / "grpo_smoke.py"
  config_file.write_text(_GRPO_CONFIG)
  run_dir = str(workspace["root"] / "grpo")
  args = ["train", "--config", f"{config_file}:{workspace['world']}", f"--config.train.run_dir={run_dir}",
          "--config.train.steps=2"]
  _wait(_launch(workspace, args, processes=2, devices=2))
  rows = _train_rows(run_dir)
  assert [row["step"] for row in rows] == [1, 2]
  for row in rows:
    assert np.isfinite(row["loss"]) and np.isfinite(row["grad_norm"]) and row["skipped_updates"] == 0
    assert row["completion_len_max"] <= 6 and row["groups_trained"] == 2  # this host's 2 prompts
  assert _finalized_steps(run_dir) == [1, 2]
