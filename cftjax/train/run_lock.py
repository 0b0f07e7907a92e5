"""One writer per run directory: RUN_DIR/run.lock, created exclusively, holds the writer's pid, host
and process start time; a second `cftjax train` on the same directory is refused with one line.

A lock whose holder is gone (same host, pid not running or reused by another process) is stale: it is
replaced with a warning. A lock from another host cannot be checked from here, so it is refused with
the path to delete when that host's run is known to be dead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunLockedError(RuntimeError):
  """Another live process holds the run directory's lock."""


def _start_time(pid: int) -> str | None:
  """The kernel's start time of process `pid` (field 22 of /proc/PID/stat), None where unknown.
  Together with the pid it names one process, so a recycled pid is not taken for the holder."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(holder: dict) -> bool:
  """Whether the process that wrote `holder` (a lock on this host) is still running."""
  pid = int(holder.get("pid", -1))
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  started = holder.get("start_time")
  return started is None or _start_time(pid) in (None, started)


class RunLock:
  """The lock of one run directory, as a context manager: acquired on entering (raises
  RunLockedError when a live process holds it), removed on exit, whatever the exit path."""

  def __init__(self, run_dir: str):
    self.path = os.path.join(run_dir, LOCK_FILE)
    self._held = False

  def _read(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # being written by its holder this instant, or damaged

  def acquire(self) -> None:
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _start_time(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._read()
        if holder is None:
          continue  # released in between
        if not holder:
          time.sleep(0.2)
          holder = self._read() or {}
        if holder.get("host") == me["host"] and not _alive(holder):
          log.warning("%s: removing a stale lock of pid %s (no longer running)", self.path,
                      holder.get("pid"))
          os.remove(self.path)
          continue
        where = (f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"
                 if holder else "an unreadable lock")
        raise RunLockedError(
            f"{os.path.dirname(self.path)} is in use by another cftjax train ({where}); wait for it "
            f"to finish or choose another train.run_dir; if that run is dead, delete {self.path}")
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self._held = True
      return
    raise RunLockedError(f"{self.path}: could not take the lock (it keeps changing hands)")

  def release(self) -> None:
    if self._held:
      self._held = False
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self) -> "RunLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
