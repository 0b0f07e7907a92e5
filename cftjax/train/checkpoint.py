"""Run checkpoints: Orbax (async) saves of the train state, per-process data-iterator state and config;
resume from the newest complete step onto target shardings (a damaged newest step is moved aside); the
best-params directory; a full disk as one line; SIGTERM and SIGINT."""

from __future__ import annotations

import errno
import gc
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from cftjax.models.checkpoint_io import RUN_BEST_DIR, RUN_CHECKPOINT_DIR, CheckpointError

log = logging.getLogger(__name__)

CORRUPT_DIR = "corrupt_checkpoints"  # RUN_DIR/corrupt_checkpoints/<step>-<time>: damaged steps moved aside
# TensorStore status codes of a read that found missing or damaged bytes (not a model mismatch).
_READ_FAILURES = ("OUT_OF_RANGE", "DATA_LOSS", "FAILED_PRECONDITION", "NOT_FOUND", "Truncated",
                  "Encountered error while reading")


def _read_failure_cause(e: BaseException) -> str:
  """One line (at most 300 characters) saying why a restore could not read the saved bytes: the first
  line of e's cause, or else of e, that names a TensorStore status (`_READ_FAILURES`, most specific
  first). Orbax's message may hold whole tracebacks of the failed reads; they are left out."""
  texts = [str(e.__cause__)] if e.__cause__ is not None else []
  lines = [line for text in texts + [str(e)] for line in text.splitlines()]
  for code in _READ_FAILURES:
    for line in lines:
      if code in line:
        return " ".join(line.split())[:300]
  return " ".join(str(e.__cause__ or e).split())[:300]


def _collect_failed_reads() -> None:
  """Frees the reads a failed restore left behind, now and without logging: Orbax raises on the first
  failed shard read and drops the others, whose exceptions asyncio would log with full tracebacks
  ("Future exception was never retrieved") whenever the garbage collector next finds them."""
  asyncio_log = logging.getLogger("asyncio")
  level = asyncio_log.level
  asyncio_log.setLevel(logging.CRITICAL)
  try:
    gc.collect()
  finally:
    asyncio_log.setLevel(level)


class CheckpointDamagedError(CheckpointError):
  """A finalized checkpoint step whose files are missing or unreadable (not a model mismatch)."""


class DiskFullError(CheckpointError):
  """A checkpoint save failed because the filesystem is full (ENOSPC)."""


def _disk_full(error: BaseException) -> bool:
  """Whether `error` or an exception it was raised from is ENOSPC (also as TensorStore's text)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(error) or "ENOSPC" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


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


class _DropDiskFullLogs(logging.Filter):
  """Drops Orbax's own log records of a full disk (a traceback from its writer thread per file):
  the DiskFullError raised in the main thread says it in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += str(record.exc_info[1])
    return "No space left on device" not in text and "os_error_code='28'" not in text


_DISK_FULL_LOG_FILTER = _DropDiskFullLogs()


class _DiskErrors:
  """Turns a save that failed on a full disk (ENOSPC, also raised later from Orbax's background
  thread) into one DiskFullError naming the directory and the newest intact step."""

  def __init__(self, manager: ocp.CheckpointManager, step: int | None):
    self._manager, self._step = manager, step

  def __enter__(self) -> None:
    return None

  def __exit__(self, kind, error, traceback) -> bool:
    del kind, traceback
    if error is None or not _disk_full(error):
      return False
    directory = self._manager.directory
    intact = ocp.utils.checkpoint_steps(str(directory)) if os.path.isdir(directory) else []
    what = f"step {self._step}" if self._step is not None else "a checkpoint"
    kept = f"step {max(intact)} is intact" if intact else "no complete checkpoint was there before"
    raise DiskFullError(f"{directory}: no space left on device (ENOSPC) while saving {what}; {kept}. "
                        "Free space or set checkpoint.max_to_keep lower, then rerun to resume") from None


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
    self._saving: dict[int, int] = {}  # id(manager) -> the step it was last asked to save
    logging.getLogger("absl").addFilter(_DISK_FULL_LOG_FILTER)  # idempotent
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
    with self._disk_errors(self._manager, step):
      self._manager.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(_IteratorStateSnapshot(data_state)),
          config=ocp.args.JsonSave(config)))
    return True

  def _disk_errors(self, manager: ocp.CheckpointManager, step: int | None) -> "_DiskErrors":
    """Turns a full disk in `manager`'s save of `step` (None: its last save) into a DiskFullError."""
    if step is not None:
      self._saving[id(manager)] = step
    return _DiskErrors(manager, self._saving.get(id(manager)))

  def complete_steps(self) -> list[int]:
    """The finalized steps, newest first."""
    return sorted(self._manager.all_steps(), reverse=True)

  def _check_complete(self, step: int) -> None:
    """Raises CheckpointDamagedError naming the file when step `step` lacks the train state's
    metadata or this process's data-iterator file, or that file is not JSON."""
    step_dir = os.path.join(self._manager.directory, str(step))
    metadata = os.path.join(step_dir, "state", "_METADATA")
    if not os.path.exists(metadata):
      raise CheckpointDamagedError(f"{metadata} is missing: the checkpoint step dir {step_dir} is incomplete")
    data = os.path.join(step_dir, "data", f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    try:
      with open(data, encoding="utf-8") as f:
        json.load(f)
    except FileNotFoundError:
      raise CheckpointDamagedError(f"{data} is missing: the checkpoint step dir {step_dir} is incomplete, "
                                   "or was saved by another number of processes") from None
    except (ValueError, UnicodeDecodeError) as e:
      raise CheckpointDamagedError(f"{data}: not valid JSON ({e}): the data-iterator state of this "
                                   "checkpoint is damaged") from None

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """(state placed on the shardings of `abstract_state`, this process's data-iterator state).

    abstract_state: the TrainState of ShapeDtypeStructs with shardings. Raises CheckpointDamagedError
    for missing or unreadable files, CheckpointError for a checkpoint of another model or optimizer.
    """
    path = os.path.join(self._manager.directory, str(step))
    self._check_complete(step)
    snapshot = _IteratorStateSnapshot()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(snapshot)))
    except Exception as e:  # pylint: disable=broad-except  (TensorStore raises plain Exception)
      text = " ".join(str(e).split())
      if not any(code in text for code in _READ_FAILURES):
        if not isinstance(e, ValueError):
          raise
        raise CheckpointError(
            f"{path}: cannot restore ({text[:500]}). A run resumes with the same model, optimizer and "
            "process count it was saved with; start a new --config.train.run_dir otherwise.") from None
      damaged = CheckpointDamagedError(f"{path}: unreadable train state ({_read_failure_cause(e)})")
    else:
      return restored.state, snapshot.state
    _collect_failed_reads()
    raise damaged

  def move_aside(self, step: int) -> str:
    """Moves a damaged step out of the checkpoints (process 0) to RUN_DIR/corrupt_checkpoints, so
    the run saves that step again; returns where it went."""
    run_dir = os.path.dirname(self._manager.directory)
    target = os.path.join(run_dir, CORRUPT_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self._manager.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
    self._manager.reload()
    return target

  # -- best params --------------------------------------------------------------------------------

  def best_value(self) -> float | None:
    """The best `best_metric` value saved so far (also across restarts), or None."""
    if self._best is None or self._best.best_step() is None:
      return None
    return float(self._best.metrics(self._best.best_step())[self.best_metric])

  def best_step(self) -> int | None:
    """The step of the saved best params, or None."""
    return None if self._best is None else self._best.best_step()

  def is_improvement(self, metrics: dict[str, float]) -> bool:
    """Whether `metrics` is at least as good as the best so far: a tie goes to the later, more trained
    step (so an untrained step 0 stays best only when every later eval is worse). A NaN / inf metric
    never is."""
    if self._best is None or self.best_metric not in metrics:
      return False
    best = self.best_value()
    value = float(metrics[self.best_metric])
    if not math.isfinite(value):
      return False
    return best is None or (value >= best if self.best_mode == "max" else value <= best)

  def maybe_save_best(self, step: int, params: Any, metrics: dict[str, float]) -> bool:
    """Saves params to RUN_DIR/best when `metrics[best_metric]` beats the best so far."""
    if not self.is_improvement(metrics):
      return False
    if self._best.latest_step() == step:
      return False
    with self._disk_errors(self._best, step):
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
    """Blocks until pending async saves are finalized (raises DiskFullError for a full disk)."""
    with self._disk_errors(self._manager, None):
      self._manager.wait_until_finished()
    if self._best is not None:
      with self._disk_errors(self._best, None):
        self._best.wait_until_finished()

  def close(self) -> None:
    with self._disk_errors(self._manager, None):
      self._manager.close()
    if self._best is not None:
      with self._disk_errors(self._best, None):
        self._best.close()


class PreemptionFlag:
  """Tells the train loop to save a checkpoint, write the summary and exit when the job is being
  preempted (SIGTERM) or interrupted (SIGINT, Ctrl-C); a second SIGINT exits at once
  (KeyboardInterrupt).

  One process: handlers set a flag (installed on entering the context, the previous handlers
  restored on exit; only the main thread can install them). Several processes: every host must stop
  at the same step, so the decision is JAX's preemption sync point (its coordination service sees a
  SIGTERM on any host), asked through Orbax's `reached_preemption`; SIGINT keeps its default there.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, checkpoints: RunCheckpoints):
    self._checkpoints = checkpoints
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}
    self.received: str | None = None  # "SIGTERM" or "SIGINT" once one arrived

  def __enter__(self) -> "PreemptionFlag":
    if jax.process_count() > 1:
      return self
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._on_signal)
    else:
      log.warning("not on the main thread: SIGTERM and SIGINT will not trigger a checkpoint")
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _on_signal(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self._event.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = self.received or name
    extra = "; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
    log.warning("%s received: saving a checkpoint after this step, then exiting%s", name, extra)
    self._event.set()

  def signalled(self) -> bool:
    """Whether this process received SIGTERM or SIGINT (no collective)."""
    return self._event.is_set()

  def should_stop(self, step: int) -> bool:
    """Whether the loop stops after `step` (a collective with several processes: call on all)."""
    if jax.process_count() > 1:
      return self._checkpoints.reached_preemption(step)
    return self._event.is_set()
