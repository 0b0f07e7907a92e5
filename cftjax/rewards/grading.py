"""Math answer grading: the last \\boxed{} answer outside `<think>` blocks checked against the gold one
by math-verify, run in killable worker processes with a hard per-call time limit (the trainer only
passes strings)."""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import logging
import multiprocessing
import queue
import resource
import sys
import threading
import types
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection

from cftjax.data.critique import last_braced_argument, remove_think

logger = logging.getLogger(__name__)

Grade = tuple[bool, str]   # (correct, reason)

_STARTUP_TIMEOUT_S = 120.0
_CLOSE_TIMEOUT_S = 2.0
_READY = "ready"


def extract_boxed(text: str) -> str | None:
  """The argument of the last `\\boxed{...}` or `\\fbox{...}` (braces matched), else None."""
  found = last_braced_argument(text, r"\boxed", r"\fbox")
  return None if found is None else found[1]


def _grade_in_worker(gold: str, pred_text: str) -> Grade:
  """Runs math-verify on one pair; called inside a worker process (never in the trainer). The answer
  is the last boxed one after `remove_think`, so reasoning never counts and its cost stays here."""
  from math_verify import parse, verify   # pylint: disable=import-outside-toplevel

  try:
    answer = extract_boxed(remove_think(pred_text))
    if answer is None:
      return False, "no boxed answer"
    gold_boxed = extract_boxed(gold)
    gold_answer = gold if gold_boxed is None else gold_boxed
    # Both sides go through math-verify's \boxed{} path; the parent process enforces the time limit.
    gold_parsed = parse(f"\\boxed{{{gold_answer}}}", parsing_timeout=None)
    if not gold_parsed:
      return False, "unparsable gold answer"
    pred_parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    if not pred_parsed:
      return False, "unparsable answer"
    if verify(gold_parsed, pred_parsed, timeout_seconds=None):
      return True, "correct"
    return False, "wrong answer"
  except Exception as e:  # pylint: disable=broad-except
    return False, f"error: {type(e).__name__}: {e}"


class GraderError(RuntimeError):
  """The math grader's worker processes cannot run (e.g. math-verify does not import)."""


def _worker_main(conn: Connection, memory_bytes: int) -> None:
  """Worker loop: receive (gold, pred_text), send (correct, reason); None or EOF stops it. Sends
  _READY once math-verify imports, else the import error's text, and exits. Its address space is
  limited to memory_bytes (a grade needing more fails with MemoryError)."""
  resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
  logging.getLogger("math_verify").setLevel(logging.ERROR)   # "timeout disabled" warnings
  try:
    import math_verify  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except Exception as e:  # pylint: disable=broad-except
    conn.send(f"{type(e).__name__}: {e}")
    return
  conn.send(_READY)
  while True:
    try:
      task = conn.recv()
    except EOFError:
      return
    if task is None:
      return
    conn.send(_grade_in_worker(*task))


def _process_context() -> multiprocessing.context.BaseContext:
  """forkserver where available (workers not forked from a multithreaded trainer), else spawn."""
  if "forkserver" in multiprocessing.get_all_start_methods():
    context = multiprocessing.get_context("forkserver")
    # Takes effect only if this starts the forkserver; then replacement workers start in ms.
    context.set_forkserver_preload(["math_verify", __name__])
    return context
  return multiprocessing.get_context("spawn")


_main_lock = threading.Lock()


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
  """While a worker starts, `__main__` is an empty module, so the worker does not re-run the
  parent's main script (multiprocessing's spawn / forkserver children do, to unpickle targets
  defined there; the grader's target is in this module). Workers thus start the same from a script,
  a script piped on stdin (`python -`, no file to re-run), a notebook, or a script without an
  `if __name__ == "__main__":` guard."""
  with _main_lock:
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
      yield
    finally:
      sys.modules["__main__"] = main


class _Worker:
  """One worker process, started on first use and restarted after it is killed."""

  def __init__(self, context: multiprocessing.context.BaseContext, memory_mb: int):
    self._context = context
    self._memory_bytes = memory_mb << 20
    self._process: multiprocessing.process.BaseProcess | None = None
    self._conn: Connection | None = None

  def _start(self) -> None:
    parent_conn, child_conn = self._context.Pipe()
    process = self._context.Process(target=_worker_main, args=(child_conn, self._memory_bytes),
                                    daemon=True,
                                    name="cftjax-math-grader")
    with _main_module_hidden():
      process.start()
    child_conn.close()
    try:
      reply = parent_conn.recv() if parent_conn.poll(_STARTUP_TIMEOUT_S) else None
    except EOFError:
      process.join()
      reply = f"it exited with code {process.exitcode} before it was ready (its error is above)"
    if reply != _READY:
      process.kill()
      process.join()
      parent_conn.close()
      raise GraderError(
          f"math grader worker process could not start: "
          f"{reply or f'no reply within {_STARTUP_TIMEOUT_S}s'}; check that math-verify imports in "
          f"this environment ({sys.executable} -c 'import math_verify')")
    self._process, self._conn = process, parent_conn

  def grade(self, gold: str, pred_text: str, timeout_s: float) -> Grade:
    if self._process is None or not self._process.is_alive():   # first use, or died while idle
      self.kill()
      self._start()
    self._conn.send((gold, pred_text))
    if not self._conn.poll(timeout_s):
      self.kill()
      return False, "timeout"
    try:
      return self._conn.recv()
    except EOFError:
      logger.warning("math grader worker died (exit code %s); restarting it",
                     self._process.exitcode)
      self.kill()
      return False, "worker crashed"

  def kill(self) -> None:
    if self._process is None:
      return
    self._process.kill()
    self._process.join()
    self._conn.close()
    self._process = self._conn = None

  def close(self) -> None:
    if self._process is None:
      return
    try:
      self._conn.send(None)
    except OSError:
      pass
    self._process.join(_CLOSE_TIMEOUT_S)
    self.kill()


class MathGrader:
  """A reusable pool of math-verify worker processes; use as a context manager or call close().

  timeout_s: per grade (the worker is killed and replaced after it); memory_mb: each worker's
  address-space limit (RLIMIT_AS).
  """

  def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, memory_mb: int = 1024):
    if num_workers < 1:
      raise ValueError(f"MathGrader: num_workers must be >= 1, got {num_workers}")
    if timeout_s <= 0:
      raise ValueError(f"MathGrader: timeout_s must be > 0, got {timeout_s}")
    self.num_workers = num_workers
    self.timeout_s = timeout_s
    context = _process_context()
    self._workers = [_Worker(context, memory_mb) for _ in range(num_workers)]
    self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
    for worker in self._workers:
      self._idle.put(worker)
    self._closed = False

  def grade(self, gold: str, pred_text: str, timeout_s: float | None = None) -> Grade:
    """(correct, reason) for one prediction; reason is "correct", "wrong answer", "timeout", ..."""
    if self._closed:
      raise RuntimeError("MathGrader.grade called after close()")
    worker = self._idle.get()
    try:
      return worker.grade(str(gold), str(pred_text),
                          self.timeout_s if timeout_s is None else timeout_s)
    finally:
      self._idle.put(worker)

  def grade_many(self, golds: Sequence[str], preds: Sequence[str]) -> list[Grade]:
    """Grades preds[i] against golds[i] on all workers in parallel, results in input order."""
    if len(golds) != len(preds):
      raise ValueError(f"MathGrader.grade_many: {len(golds)} golds but {len(preds)} preds")
    if not golds:
      return []
    num_threads = min(self.num_workers, len(golds))
    with concurrent.futures.ThreadPoolExecutor(num_threads, "cftjax-grade") as threads:
      return list(threads.map(self.grade, golds, preds))

  def close(self) -> None:
    self._closed = True
    for worker in self._workers:
      worker.close()

  def __enter__(self) -> "MathGrader":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


_shared: MathGrader | None = None
_shared_lock = threading.Lock()


def shared_grader() -> MathGrader:
  """A process-wide MathGrader (2 workers), created on first use and closed at exit."""
  global _shared
  with _shared_lock:
    if _shared is None:
      _shared = MathGrader(num_workers=2)
      atexit.register(_shared.close)
    return _shared


def grade_math(gold: str, pred_text: str, timeout_s: float = 5.0) -> Grade:
  """(correct, reason): is the last boxed answer in pred_text equivalent to gold (math-verify)?

  gold may be a bare answer ("\\frac{1}{2}") or text containing a \\boxed{} answer. Runs on the
  shared worker pool; use a MathGrader for batches.
  """
  return shared_grader().grade(gold, pred_text, timeout_s)
