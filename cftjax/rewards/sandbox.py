"""Sandboxed execution of untrusted Python programs (code rewards): limits, isolation, test runs."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

logger = logging.getLogger(__name__)

# What holds, from strongest to weakest:
# - Enforced by the kernel: a separate session/process group, SIGKILLed as a whole after the run or
#   on timeout; rlimits on CPU time, address space, file size (stdout/stderr included), open files,
#   core dumps (0), and processes (only inside a user namespace: RLIMIT_NPROC does not bind root);
#   an empty environment; a fresh working directory deleted afterwards; no network when the child
#   can enter a new network namespace (unshare(CLONE_NEWUSER|CLONE_NEWNET), else CLONE_NEWNET):
#   `SandboxResult.isolation` says "netns" when that succeeded.
# - Best effort (a Python audit hook installed before the program runs, `python -I -S -B`): refuses
#   opening files for writing outside the working dir (and relative os.open writes, whose dir_fd it
#   cannot see), creating/removing/renaming/chmod-ing paths outside it, links, sockets, fork/exec/
#   spawn/subprocess/os.system, _posixsubprocess and ctypes, signalling other processes, and reading
#   other processes' /proc entries. Hostile code can defeat an in-process hook (e.g. by patching
#   the stdlib it relies on); the child keeps the trainer's uid, so files the trainer may write are
#   guarded only by this hook. For untrusted code at scale, also run the trainer as an unprivileged
#   user in a container.
# The program sees only the standard library (-S: no site-packages).

_STDERR_TAIL_CHARS = 2000
_warned_without_netns = False
_REFUSED = "PermissionError: sandbox refused: "   # how the child's audit hook reports a refusal

# Runs in the child (`python -I -S -B -c`), before the program: namespaces, rlimits, audit hook.
_CHILD_BOOTSTRAP = r'''
import json, os, resource, sys, types

config = json.loads(sys.argv[1])
work = config["work_dir"]


def isolate_network():
  try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for flags in (0x10000000 | 0x40000000, 0x40000000):   # CLONE_NEWUSER|CLONE_NEWNET, CLONE_NEWNET
      if libc.unshare(flags) == 0:
        return "netns", bool(flags & 0x10000000)
  except Exception:
    pass
  return "audit-hook", False


isolation, own_user_namespace = isolate_network()
for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
  del sys.modules[name]
with open(config["isolation_file"], "w") as report:
  report.write(isolation)

limits = [(resource.RLIMIT_CPU, config["cpu_s"], config["cpu_s"] + 1),
          (resource.RLIMIT_AS, config["memory_bytes"], config["memory_bytes"]),
          (resource.RLIMIT_FSIZE, config["file_bytes"], config["file_bytes"]),
          (resource.RLIMIT_NOFILE, 256, 256), (resource.RLIMIT_CORE, 0, 0)]
if own_user_namespace:
  limits.append((resource.RLIMIT_NPROC, config["max_processes"], config["max_processes"]))
for limit, soft, hard in limits:
  _, current_hard = resource.getrlimit(limit)
  if current_hard != resource.RLIM_INFINITY:
    soft, hard = min(soft, current_hard), min(hard, current_hard)
  resource.setrlimit(limit, (soft, hard))


def make_hook(work, pid, realpath=os.path.realpath, fsdecode=os.fsdecode, isabs=os.path.isabs,
              write_flags=os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC):
  work_prefix = work + "/"
  # event: (indices of path arguments, indices of dir_fd arguments)
  path_events = {
      "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
      "os.rename": ((0, 1), (2, 3)), "os.truncate": ((0,), ()), "os.chmod": ((0,), (2,)),
      "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)), "os.setxattr": ((0,), ()),
      "os.removexattr": ((0,), ()), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
      "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)), "shutil.rmtree": ((0,), ()),
  }
  denied = frozenset(("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn",
                      "os.spawn", "subprocess.Popen", "os.killpg", "signal.pthread_kill", "os.link",
                      "os.symlink", "os.chroot", "os.setns", "os.unshare", "pty.spawn"))
  denied_prefixes = ("socket.", "ctypes.")
  denied_imports = frozenset(("_posixsubprocess", "_ctypes", "ctypes"))

  def resolved(path):
    return realpath(fsdecode(path))

  def inside_work(path):
    if isinstance(path, int):   # an already open descriptor
      return True
    path = resolved(path)
    return path == work or path.startswith(work_prefix)

  def other_process_entry(path):
    if isinstance(path, int):
      return False
    parts = resolved(path).split("/")
    return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != str(pid)

  def deny(event):
    raise PermissionError(f"sandbox refused: {event}")

  def hook(event, args):
    if event == "open":
      path, mode, flags = args
      if flags & write_flags:
        relative_os_open = mode is None and not isinstance(path, int) and not isabs(fsdecode(path))
        if relative_os_open or not inside_work(path):
          deny(f"writing {path!r}")
      elif other_process_entry(path):
        deny(f"reading {path!r}")
    elif event in path_events:
      path_indices, dir_fd_indices = path_events[event]
      if any(args[i] not in (None, -1) for i in dir_fd_indices if i < len(args)):   # -1: default
        deny(f"{event} with dir_fd")
      for i in path_indices:
        if not inside_work(args[i]):
          deny(f"{event} {args[i]!r}")
    elif event == "os.kill":
      if args[0] != pid:
        deny(event)
    elif event == "import":
      if args[0] in denied_imports:
        deny(f"import {args[0]}")
    elif event in denied or event.startswith(denied_prefixes):
      deny(event)

  return hook


sys.addaudithook(make_hook(work, os.getpid()))
del make_hook, isolate_network, limits, report
main = types.ModuleType("__main__")
main.__file__ = "solution.py"
sys.modules["__main__"] = main
sys.argv = ["solution.py"]
with open("solution.py", encoding="utf-8") as source:
  program = compile(source.read(), "solution.py", "exec")
exec(program, main.__dict__)
'''


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """Outcome of one sandboxed run.

  Attributes:
    stdout, stderr: the program's output (decoded as UTF-8, undecodable bytes replaced).
    returncode: exit status; negative = killed by that signal.
    timed_out: the wall-clock limit was hit (the process group was killed).
    reason: "ok", or why it failed ("wall time limit", "memory limit", "blocked: ...", ...).
    isolation: "netns" (own network namespace) or "audit-hook" (sockets refused by the hook only).
  """

  stdout: str
  stderr: str
  returncode: int
  timed_out: bool
  reason: str
  isolation: str = "audit-hook"


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _failure_reason(returncode: int, stderr: str, timed_out: bool) -> str:
  if timed_out:
    return "wall time limit"
  if returncode == -signal.SIGXCPU:
    return "cpu time limit"
  if returncode == -signal.SIGKILL:
    return "killed by SIGKILL (cpu hard limit or out of memory)"
  if returncode == -signal.SIGXFSZ:
    return "output/file size limit"
  if returncode < 0:
    return f"killed by {signal.Signals(-returncode).name}"
  if "MemoryError" in stderr:
    return "memory limit"
  refused = stderr.rfind(_REFUSED)
  if refused >= 0:
    return "blocked: " + stderr[refused + len(_REFUSED):].split("\n")[0]
  if "[Errno 27] File too large" in stderr:   # Python ignores SIGXFSZ, so the write fails instead
    return "output/file size limit"
  if returncode != 0:
    last_line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return f"runtime error: {last_line[:200]}" if last_line else f"exit code {returncode}"
  return "ok"


def _warn_once_without_netns(isolation: str) -> None:
  global _warned_without_netns
  if isolation != "netns" and not _warned_without_netns:
    _warned_without_netns = True
    logger.warning("sandbox: no network namespace could be created here (unshare refused); "
                   "sandboxed programs are kept off the network by the audit hook only")


def _read_text(path: str, limit_bytes: int) -> str:
  with open(path, "rb") as f:
    return f.read(limit_bytes).decode("utf-8", errors="replace")


def run_python(code: str, stdin: str = "", wall_s: float = 5.0, cpu_s: float = 5.0,
               memory_mb: int = 512, output_mb: int = 16, max_processes: int = 16) -> SandboxResult:
  """Runs a Python program in a sandbox (what is guaranteed: the notes at the top of this module).

  Args:
    code: the program source; it sees only the standard library.
    stdin: text fed to its standard input.
    wall_s: wall-clock limit; the whole process group is SIGKILLed when it passes.
    cpu_s: CPU-time limit (RLIMIT_CPU, rounded up to whole seconds).
    memory_mb: address-space limit (RLIMIT_AS).
    output_mb: limit on any file it writes, stdout and stderr included (RLIMIT_FSIZE).
    max_processes: RLIMIT_NPROC inside its user namespace (threads count too).
  """
  root = tempfile.mkdtemp(prefix="cftjax_sandbox_")
  try:
    work = os.path.join(root, "work")
    os.mkdir(work)
    with open(os.path.join(work, "solution.py"), "w", encoding="utf-8") as f:
      f.write(code)
    paths = {name: os.path.join(root, name) for name in ("stdin", "stdout", "stderr", "isolation")}
    with open(paths["stdin"], "w", encoding="utf-8") as f:
      f.write(stdin)
    config = {"work_dir": os.path.realpath(work), "isolation_file": paths["isolation"],
              "cpu_s": max(1, math.ceil(cpu_s)), "memory_bytes": memory_mb << 20,
              "file_bytes": output_mb << 20, "max_processes": max_processes}
    command = [sys.executable, "-I", "-S", "-B", "-c", _CHILD_BOOTSTRAP, json.dumps(config)]
    with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, \
        open(paths["stderr"], "wb") as ferr:
      process = subprocess.Popen(command, stdin=fin, stdout=fout, stderr=ferr, cwd=work,
                                 env={"HOME": work, "TMPDIR": work}, start_new_session=True)
      try:
        process.wait(timeout=wall_s)
        timed_out = False
      except subprocess.TimeoutExpired:
        timed_out = True
      finally:
        _kill_group(process.pid)   # also reaps anything the program left behind in its group
        process.wait()
    limit_bytes = (output_mb << 20) + 1
    stdout = _read_text(paths["stdout"], limit_bytes)
    stderr = _read_text(paths["stderr"], limit_bytes)
    isolation = _read_text(paths["isolation"], 64) if os.path.exists(paths["isolation"]) else ""
    reason = _failure_reason(process.returncode, stderr, timed_out)
    _warn_once_without_netns(isolation)
    return SandboxResult(stdout=stdout, stderr=stderr[-_STDERR_TAIL_CHARS:],
                         returncode=process.returncode, timed_out=timed_out, reason=reason,
                         isolation=isolation or "audit-hook")
  finally:
    shutil.rmtree(root, ignore_errors=True)


def _as_text(value: Any) -> str:
  """A test input/output as text: lists are lines."""
  if isinstance(value, (list, tuple)):
    return "\n".join(str(v) for v in value)
  return str(value)


def _output_lines(text: str) -> list[str]:
  return [line.strip() for line in text.strip().splitlines()]


def _test_cases(tests: Any) -> list[tuple[str, str, str | None]]:
  """(extra program text, stdin, expected stdout or None) per test; see run_tests."""
  if isinstance(tests, str):
    try:
      tests = json.loads(tests)
    except json.JSONDecodeError as e:
      raise ValueError(f"run_tests: tests is a string but not JSON ({e}); pass a dict "
                       "{'inputs': [...], 'outputs': [...]} or a list of assert statements") from e
  if isinstance(tests, dict):
    if "fn_name" in tests:
      raise ValueError("run_tests: call-based tests ('fn_name') are not supported; convert them to "
                       "assert statements")
    if "inputs" not in tests or "outputs" not in tests:
      raise ValueError(f"run_tests: a test dict needs 'inputs' and 'outputs', "
                       f"got keys {sorted(tests)}")
    inputs, outputs = tests["inputs"], tests["outputs"]
    if len(inputs) != len(outputs):
      raise ValueError(f"run_tests: {len(inputs)} inputs but {len(outputs)} outputs")
    return [("", _as_text(i), _as_text(o)) for i, o in zip(inputs, outputs)]
  if isinstance(tests, (list, tuple)) and all(isinstance(t, str) for t in tests):
    return [("\n\n" + assertion + "\n", "", None) for assertion in tests]
  raise ValueError(f"run_tests: tests must be a dict with 'inputs'/'outputs' or a list of assert "
                   f"strings, got {type(tests).__name__}")


def run_tests(code: str, tests: Any, wall_s: float = 5.0, cpu_s: float = 5.0,
              memory_mb: int = 512, num_workers: int = 4) -> tuple[float, list[str]]:
  """(pass rate in [0, 1], per-test reason) of a program on its tests, run in parallel sandboxes.

  tests: {"inputs": [...], "outputs": [...]} stdin/stdout pairs (outputs compared line by line after
  stripping), or a list of assert statements each run after the program; a JSON string of either.
  """
  cases = _test_cases(tests)
  if not cases:
    raise ValueError("run_tests: no tests given")

  def run_case(case: tuple[str, str, str | None]) -> str:
    extra, stdin, expected = case
    result = run_python(code + extra, stdin=stdin, wall_s=wall_s, cpu_s=cpu_s, memory_mb=memory_mb)
    if result.reason != "ok":
      return result.reason
    if expected is not None and _output_lines(result.stdout) != _output_lines(expected):
      return "wrong answer"
    return "passed"

  num_threads = min(num_workers, len(cases))
  with concurrent.futures.ThreadPoolExecutor(num_threads, "cftjax-sandbox") as pool:
    reasons = list(pool.map(run_case, cases))
  return sum(r == "passed" for r in reasons) / len(reasons), reasons

