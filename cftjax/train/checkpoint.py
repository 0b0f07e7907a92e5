"""Run checkpoints: Orbax (async) saves of the train state, per-process data-iterator state and config;
resume from the latest finalized step onto target shardings; the best-params directory; SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from cftjax.models.checkpoint_io import RUN_BEST_DIR, RUN_CHECKPOINT_DIR, CheckpointError

log = logging.getLogger(__name__)


class _IteratorStateSnapshot:
  """A data-iterator state frozen (as JSON bytes) when a save starts, shaped for Grain's Orbax handler.

  Grain's handler writes `get_state()` to `process_<i>-of-<n>.json` (one file per process, so every
  host resumes its own shard) from Orbax's background thread; encoding at construction keeps the
  saved state that of the step being saved while the loop goes on pulling batches.
  """

  def __init__(self, state: Any = None):
    self._encoded = json.dumps(state).encode()

  @property
  def state(self) -> Any:
    return json.loads(self._encoded)

  def get_state(self) -> bytes:
    return self._encoded

  def set_state(self, raw: bytes) -> None:
    self._encoded = bytes(raw)

  def start_prefetch(self) -> None:  # called by Grain's handler after restoring
    pass


class RunCheckpoints:
  """The checkpoints of one run directory.

  RUN_DIR/checkpoints/<step>/ holds items "state" (the TrainState pytree: step, params, opt_state,
  rng), "data" (each process's data-iterator state as JSON) and "config" (the resolved config).
  Orbax writes a step into `<step>.orbax-checkpoint-tmp-<n>` and renames it when every item is
  written (on GCS, where renames are not atomic, it writes `commit_success.txt` last instead);
  `latest_step` only lists finalized steps, so a save cut short by a kill is never restored (and is
  removed on the next save). The newest `max_to_keep` steps are kept.

  RUN_DIR/best/<step>/ holds item "params" of the step with the best eval metric so far. It is a
  second manager because Orbax's `best_fn` changes what `max_to_keep` keeps: the N best steps by
  metric rather than the N newest, which would lose the latest state a resume needs. Here `best_fn`
  with max_to_keep=1 keeps one step; params are saved only when the metric improves.
  """

  def __init__(self, run_dir: str, *, max_to_keep: int = 2, async_save: bool = True,
               best_metric: str = "", best_mode: str = "max"):
    if best_mode not in ("max", "min"):
      raise ValueError(f"checkpoint.best_mode={best_mode!r}: use 'max' or 'min'")
    self.best_metric, self.best_mode = best_metric, best_mode
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(run_dir, RUN_CHECKPOINT_DIR)),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             enable_async_checkpointing=async_save),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})
    self._best = None
    if best_metric:
      self._best = ocp.CheckpointManager(
          os.path.abspath(os.path.join(run_dir, RUN_BEST_DIR)),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, best_fn=lambda metrics: float(metrics[best_metric]), best_mode=best_mode,
              keep_checkpoints_without_metrics=False, enable_async_checkpointing=async_save),
          item_handlers={"params": ocp.StandardCheckpointHandler()})

  @classmethod
  def from_config(cls, run_dir: str, checkpoint: Any) -> "RunCheckpoints":
    """The checkpoints of a run as a config's `checkpoint` section sets them up."""
    return cls(run_dir, max_to_keep=checkpoint.max_to_keep, async_save=checkpoint.async_save,
               best_metric=checkpoint.best_metric, best_mode=checkpoint.best_mode)

  # -- train state --------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest finalized step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: Any, config: dict[str, Any]) -> bool:
    """Starts saving `step` (returns at once when async); False if that step is already saved."""
    if self._manager.latest_step() == step:
      return False
    self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(_IteratorStateSnapshot(data_state)),
        config=ocp.args.JsonSave(config)))
    return True

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """(state placed on the shardings of `abstract_state`, this process's data-iterator state).

    abstract_state: the TrainState of ShapeDtypeStructs with shardings .
    """
    path = os.path.join(self._manager.directory, str(step))
    snapshot = _IteratorStateSnapshot()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(snapshot)))
    except ValueError as e:
      raise CheckpointError(
          f"{path}: cannot restore ({e}). A run resumes with the same model, optimizer and process "
          "count it was saved with; start a new --config.train.run_dir otherwise.") from e
    return restored.state, snapshot.state

  # -- best params --------------------------------------------------------------------------------

  def best_value(self) -> float | None:
    """The best `best_metric` value saved so far (also across restarts), or None."""
    if self._best is None or self._best.best_step() is None:
      return None
    return float(self._best.metrics(self._best.best_step())[self.best_metric])

  def is_improvement(self, metrics: dict[str, float]) -> bool:
    if self._best is None or self.best_metric not in metrics:
      return False
    best = self.best_value()
    value = float(metrics[self.best_metric])
    return best is None or (value > best if self.best_mode == "max" else value < best)

  def maybe_save_best(self, step: int, params: Any, metrics: dict[str, float]) -> bool:
    """Saves params to RUN_DIR/best when `metrics[best_metric]` beats the best so far."""
    if not self.is_improvement(metrics):
      return False
    if self._best.latest_step() == step:
      return False
    self._best.save(step, force=True, metrics={k: float(v) for k, v in metrics.items()},
                    args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    log.info("step %d: new best %s = %.4f saved to %s", step, self.best_metric,
             metrics[self.best_metric], self._best.directory)
    return True

  def reached_preemption(self, step: int) -> bool:
    """Whether all processes agree the job is being preempted at `step` (multi-process only)."""
    return self._manager.reached_preemption(step)

  # -- lifecycle ----------------------------------------------------------------------------------

  def wait(self) -> None:
    """Blocks until pending async saves are finalized."""
    self._manager.wait_until_finished()
    if self._best is not None:
      self._best.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
    if self._best is not None:
      self._best.close()


class PreemptionFlag:
  """Tells the train loop to save a checkpoint and exit 0 when the job is being preempted (SIGTERM).

  One process: a SIGTERM handler sets a flag (installed on entering the context, the previous
  handler restored on exit; only the main thread can install one). Several processes: every host
  must stop at the same step, so the decision is JAX's preemption sync point (its coordination
  service sees a SIGTERM on any host), asked through Orbax's `reached_preemption`.
  """

  def __init__(self, checkpoints: RunCheckpoints):
    self._checkpoints = checkpoints
    self._event = threading.Event()
    self._previous = None

  def __enter__(self) -> "PreemptionFlag":
    if jax.process_count() > 1:
      return self
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    else:
      log.warning("not on the main thread: SIGTERM will not trigger a checkpoint")
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    log.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
    self._event.set()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._checkpoints.reached_preemption(step)
    return self._event.is_set()
