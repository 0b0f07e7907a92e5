"""Run checkpoints: round trip onto target shardings, finalized-only resume, retention, best params,
data-state snapshots and the SIGTERM flag."""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import optax
import pytest

from cftjax.models import checkpoint_io
from cftjax.train import checkpoint as ckpt
from cftjax.train.state import TrainState


def _mesh():
  devices = jax.devices()
  return jax.make_mesh((len(devices),), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def _state(seed: int = 0) -> TrainState:
  mesh = _mesh()
  rows = 8 * len(jax.devices())
  key = jax.random.PRNGKey(seed)
  params = {"w": jax.device_put(jax.random.normal(key, (rows, 4)), NamedSharding(mesh, PartitionSpec("fsdp"))),
            "b": jnp.arange(3, dtype=jnp.float32) + seed}
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return TrainState(step=jnp.int32(7 + seed), params=params, opt_state=opt_state, rng=jax.random.PRNGKey(42))


def _abstract(state: TrainState) -> TrainState:
  shardings = jax.tree.map(lambda x: x.sharding, state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_restores_state_data_and_shardings(tmp_path):
  state = _state()
  data_state = {"parent": {"next_index": 17}, "counts": {"kept": 5}}
  run = ckpt.RunCheckpoints(str(tmp_path), max_to_keep=2, async_save=True)
  assert run.latest_step() is None
  assert run.save(7, state, data_state, {"optim": {"lr": 0.1}})
  data_state["parent"]["next_index"] = 99  # the loop moves on while the async save runs
  assert not run.save(7, state, data_state, {})  # a step is saved once
  run.wait()
  run.close()

  resumed = ckpt.RunCheckpoints(str(tmp_path), max_to_keep=2)
  assert resumed.latest_step() == 7
  abstract = _abstract(state)
  restored, restored_data = resumed.restore(7, abstract)
  resumed.close()
  assert isinstance(restored, TrainState)
  _assert_trees_equal(restored, state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    assert got.sharding == want.sharding
  assert restored_data == {"parent": {"next_index": 17}, "counts": {"kept": 5}}
  per_process = os.listdir(tmp_path / "checkpoints" / "7" / "data")
  assert "process_0-of-1.json" in per_process


def test_params_of_the_latest_or_a_numbered_step_are_read_from_the_train_state(tmp_path):
  """checkpoint_io.load_run_params reads only the params of RUN_DIR/checkpoints/<step>/state, onto
  the target's shardings; a step that is not there, or no best/, is a one-line error naming what
  exists."""
  run = ckpt.RunCheckpoints(str(tmp_path), max_to_keep=3, async_save=False)
  for step in (1, 2):
    run.save(step, _state(step), {}, {})
  run.close()
  target = _abstract(_state()).params
  for spec, want in ((f"{tmp_path}:latest", 2), (f"{tmp_path}:step=1", 1), (str(tmp_path), 2)):
    number, params = checkpoint_io.load_run_params(spec, target)
    assert number == want
    _assert_trees_equal(params, _state(want).params)
    assert params["w"].sharding == target["w"].sharding
  with pytest.raises(FileNotFoundError, match=r":step=5: no step 5 in .* \(saved steps \[1, 2\], no best/\)"):
    checkpoint_io.load_run_params(f"{tmp_path}:step=5", target)
  with pytest.raises(FileNotFoundError, match=r":best: the run has no best/ checkpoint: .*saved steps "
                                              r"\[1, 2\].*use .*:latest or .*:step=N"):
    checkpoint_io.load_run_params(f"{tmp_path}:best", target)
  with pytest.raises(ValueError, match="unknown checkpoint selector 'newest'; use RUN_DIR, RUN_DIR:best"):
    checkpoint_io.load_run_params(f"{tmp_path}:newest", target)


def test_unfinalized_step_is_never_restored_and_old_steps_are_pruned(tmp_path):
  run = ckpt.RunCheckpoints(str(tmp_path), max_to_keep=2, async_save=False)
  for step in (1, 2, 3):
    run.save(step, _state(), {"i": step}, {})
  run.close()
  # What a kill in the middle of saving step 9 leaves behind (Orbax's temporary-dir naming).
  partial = tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1700000000"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_text("cut short")
  resumed = ckpt.RunCheckpoints(str(tmp_path), max_to_keep=2)
  assert resumed.latest_step() == 3
  _, data_state = resumed.restore(3, _abstract(_state()))
  assert data_state == {"i": 3}
  resumed.close()
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps == [2, 3]


def test_restore_with_another_structure_names_the_run_dir(tmp_path):
  run = ckpt.RunCheckpoints(str(tmp_path), async_save=False)
  run.save(1, _state(), {}, {})
  run.close()
  other = _abstract(_state())
  other = other.replace(params={"w": other.params["w"]})  # a model without "b"
  with pytest.raises(ckpt.CheckpointError, match="checkpoints/1"):
    ckpt.RunCheckpoints(str(tmp_path)).restore(1, other)


@pytest.mark.parametrize("mode,values,best", [("max", [0.5, 0.7, 0.6], 0.7), ("min", [0.5, 0.7, 0.4], 0.4)])
def test_best_params_follow_the_metric_across_restarts(tmp_path, mode, values, best):
  run = ckpt.RunCheckpoints(str(tmp_path), best_metric="acc", best_mode=mode, async_save=False)
  saved = [run.maybe_save_best(step, _state(step).params, {"acc": v, "loss": 1.0})
           for step, v in enumerate(values[:2], 1)]
  run.close()
  restarted = ckpt.RunCheckpoints(str(tmp_path), best_metric="acc", best_mode=mode, async_save=False)
  saved.append(restarted.maybe_save_best(3, _state(3).params, {"acc": values[2]}))
  assert restarted.best_value() == best
  restarted.close()
  best_step = values.index(best) + 1
  assert saved == [True, values[1] > values[0] if mode == "max" else values[1] < values[0], best_step == 3]
  assert sorted(os.listdir(tmp_path / "best")) == [str(best_step)]
  step, params = checkpoint_io.load_run_params(f"{tmp_path}:best", _abstract(_state()).params)
  assert step == best_step
  _assert_trees_equal(params, _state(best_step).params)


def test_sigterm_sets_the_flag_and_the_old_handler_comes_back(tmp_path):
  previous = signal.getsignal(signal.SIGTERM)
  run = ckpt.RunCheckpoints(str(tmp_path))
  with ckpt.PreemptionFlag(run) as flag:
    assert not flag.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.should_stop(1)
  assert signal.getsignal(signal.SIGTERM) is previous
  run.close()


def test_an_unreadable_state_is_named_by_its_tensorstore_status_without_orbax_tracebacks():
  """Orbax can raise one exception whose message holds the tracebacks of the failed shard reads (seen
  in a CI run of test_run_safety's damaged-checkpoint test): the warning keeps the status line only."""
  message = ("Encountered error while reading array index: (slice(0, 384, 1), slice(8, 12, 1)). See full "
             "TensorStore details: <bound method TensorStore.spec>.\nTraceback (most recent call last):\n"
             '  File "serialization.py", line 260, in _read_shard\n'
             'ValueError: OUT_OF_RANGE: Error reading "params.embedding/0.2" in OCDBT database: Requested '
             "byte range [5720, 11434) is not valid for value of size 64\n")
  cause = ckpt._read_failure_cause(Exception(message))  # pylint: disable=protected-access
  assert cause == ('ValueError: OUT_OF_RANGE: Error reading "params.embedding/0.2" in OCDBT database: '
                   "Requested byte range [5720, 11434) is not valid for value of size 64")
  with_cause = Exception("outer")
  with_cause.__cause__ = ValueError("DATA_LOSS: checksum mismatch\nmore")
  assert ckpt._read_failure_cause(with_cause) == "DATA_LOSS: checksum mismatch"  # pylint: disable=protected-access
