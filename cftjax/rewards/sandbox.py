"""Runs one untrusted Python program under OS isolation (bubblewrap + seccomp); docs/security.md.

With isolation "bwrap" each run gets fresh user, mount, pid, network, ipc, uts and cgroup namespaces;
a read-only root holding only the Python interpreter, its standard library (no site-packages) and
the shared libraries they load; a fresh /proc of its own pid namespace; a minimal /dev; a tmpfs of
`disk_mb` at /work as the only writable place; rlimits on CPU, address space, file size, open files
and processes (RLIMIT_NPROC set inside the namespace, so it counts this run's processes only); a
seccomp filter refusing the calls that reach outside the namespaces (`_DENIED_SYSCALLS`); an empty
environment; the uid `nobody`. When the trainer runs as root, bwrap is started as `nobody` through
an outer mount namespace that exposes only the runtime files (root's files stay unreachable, and
RLIMIT_NPROC binds, which it never does for root). The run's pid namespace dies with it: nothing it
started outlives the call.

Isolation "none" runs the program as a plain child process (rlimits, a new session killed as a
whole, an empty environment, a temporary working directory): the model's code then has the
trainer's user's rights. It is only for machines without user namespaces, chosen explicitly with
`rl.code.isolation = "none"`.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile

logger = logging.getLogger(__name__)

ISOLATIONS = ("bwrap", "none")
_NOBODY = 65534
_STDERR_TAIL_CHARS = 2000
_CHILD_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
_STAGE = "/run/cftjax-sandbox"   # where the outer (root) namespace exposes the runtime files
_TEARDOWN_S = 5.0
# Refused with EPERM inside the sandbox (clone3 with ENOSYS, so the C library falls back to clone,
# whose namespace flags bwrap's --disable-userns and the missing capabilities already refuse).
_DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_open", "pidfd_getfd",
    "pidfd_send_signal", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns", "keyctl",
    "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "reboot", "swapon", "swapoff", "syslog", "acct", "quotactl",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "open_by_handle_at",
    "name_to_handle_at", "lookup_dcookie", "vhangup", "iopl", "ioperm", "uselib", "personality",
    "fanotify_init", "sethostname", "setdomainname", "mbind", "migrate_pages", "move_pages",
    "set_mempolicy")


class IsolationUnavailable(RuntimeError):
  """The requested isolation cannot be set up on this machine."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-run limits. wall_s: wall clock (the run is killed); cpu_s: RLIMIT_CPU (whole seconds,
  rounded up); memory_mb: RLIMIT_AS of each process; output_mb: RLIMIT_FSIZE (stdout, stderr and
  any one file); disk_mb: size of the writable tmpfs; max_processes: RLIMIT_NPROC (threads count);
  open_files: RLIMIT_NOFILE."""

  wall_s: float = 5.0
  cpu_s: float = 5.0
  memory_mb: int = 512
  output_mb: int = 16
  disk_mb: int = 64
  max_processes: int = 16
  open_files: int = 256


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """Outcome of one run.

  stdout, stderr: the program's output (UTF-8, undecodable bytes replaced; stderr's tail only).
  returncode: exit status; negative = killed by that signal.
  timed_out: the wall-clock limit was hit (everything it started was killed).
  reason: "ok", or why it failed ("wall time limit", "memory limit", "runtime error: ...", ...).
  isolation: "bwrap" or "none".
  """

  stdout: str
  stderr: str
  returncode: int
  timed_out: bool
  reason: str
  isolation: str


def _interpreter() -> str:
  return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _stdlib_dirs() -> tuple[str, str | None]:
  """(the standard library dir, its site-packages if it holds one)."""
  stdlib = os.path.realpath(sysconfig.get_path("stdlib"))
  site = os.path.join(stdlib, "site-packages")
  return stdlib, site if os.path.isdir(site) else None


def _shared_libraries(binaries: list[str]) -> list[str]:
  """The shared libraries (and the dynamic loader) `ldd` reports for binaries."""
  result = subprocess.run(["ldd", *binaries], capture_output=True, text=True, check=False)
  paths = set()
  for line in result.stdout.splitlines():
    words = line.split()
    for i, word in enumerate(words):
      if word.startswith("/") and not word.endswith(":") and (i == 0 or words[i - 1] == "=>"):
        paths.add(word)
  return sorted(paths)


@functools.lru_cache(maxsize=None)
def _runtime_files() -> tuple[str, ...]:
  """Paths bound read-only into the sandbox: the interpreter, the standard library and every
  shared library they load (nothing else of the host)."""
  interpreter = _interpreter()
  stdlib, _ = _stdlib_dirs()
  dynload = os.path.join(stdlib, "lib-dynload")
  extensions = sorted(os.path.join(dynload, n) for n in os.listdir(dynload) if n.endswith(".so")) \
      if os.path.isdir(dynload) else []
  files = [interpreter, stdlib, *_shared_libraries([interpreter, *extensions])]
  if os.path.exists("/etc/ld.so.cache"):
    files.append("/etc/ld.so.cache")
  return tuple(dict.fromkeys(files))


@functools.lru_cache(maxsize=None)
def _seccomp_program() -> bytes:
  """The compiled BPF filter (libseccomp through pyseccomp), denying _DENIED_SYSCALLS."""
  try:
    import pyseccomp  # pylint: disable=import-outside-toplevel
  except (ImportError, OSError) as e:   # OSError: libseccomp.so.2 missing
    raise IsolationUnavailable(f"the seccomp filter needs pyseccomp and libseccomp2 ({e}); "
                               "install them (pip install pyseccomp; apt-get install libseccomp2)")
  syscall_filter = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
  for name in _DENIED_SYSCALLS:
    syscall_filter.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
  syscall_filter.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
  with tempfile.TemporaryFile() as f:
    syscall_filter.export_bpf(f)
    f.seek(0)
    return f.read()


@functools.lru_cache(maxsize=None)
def _child_source() -> bytes:
  with open(_CHILD_SOURCE, "rb") as f:
    return f.read()


def _data_fd(data: bytes) -> int:
  """A readable file descriptor holding data (an anonymous memory file), positioned at 0."""
  fd = os.memfd_create("cftjax-sandbox", os.MFD_CLOEXEC)
  os.write(fd, data)   # memfd writes are complete
  os.lseek(fd, 0, os.SEEK_SET)
  os.set_inheritable(fd, True)
  return fd


def _bwrap_command(files: dict[str, int], seccomp_fd: int, info_fd: int, disk_mb: int,
                   child_args: list[str]) -> list[str]:
  """The bwrap command line; files: {path inside: readable fd} bound read-only."""
  runtime = _runtime_files()
  _, site_packages = _stdlib_dirs()
  as_root = os.geteuid() == 0
  outer: list[str] = []
  if as_root:
    outer = ["bwrap", "--dev-bind", "/", "/", "--tmpfs", "/run", "--perms", "0755", "--dir", _STAGE]
    for i, path in enumerate(runtime):
      outer += ["--ro-bind", path, f"{_STAGE}/{i}"]
    outer += ["--", "setpriv", f"--reuid={_NOBODY}", f"--regid={_NOBODY}", "--clear-groups", "--"]
  inner = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
           "--new-session", "--as-pid-1", "--uid", str(_NOBODY), "--gid", str(_NOBODY),
           "--hostname", "sandbox",
           "--clearenv", "--setenv", "HOME", "/work", "--setenv", "TMPDIR", "/work",
           "--setenv", "PATH", "/nonexistent", "--info-fd", str(info_fd)]
  for i, path in enumerate(runtime):
    inner += ["--ro-bind", f"{_STAGE}/{i}" if as_root else path, path]
  if site_packages:
    inner += ["--tmpfs", site_packages, "--remount-ro", site_packages]
  inner += ["--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(disk_mb << 20), "--tmpfs", "/work",
            "--seccomp", str(seccomp_fd), "--chdir", "/work"]
  for path, fd in files.items():
    inner += ["--ro-bind-data", str(fd), path]
  return outer + inner + ["--", _interpreter(), "-I", "-S", "-B", *child_args]


@functools.lru_cache(maxsize=None)
def _bwrap_version() -> str:
  """`bwrap --version`, or IsolationUnavailable."""
  if shutil.which("bwrap") is None:
    raise IsolationUnavailable("bubblewrap (bwrap) is not installed (apt-get install bubblewrap)")
  if os.geteuid() == 0 and shutil.which("setpriv") is None:
    raise IsolationUnavailable("running as root needs setpriv (util-linux) to start bwrap as nobody")
  return subprocess.run(["bwrap", "--version"], capture_output=True, text=True,
                        check=False).stdout.strip()


_probe_result: str | None = None


def check_isolation(isolation: str = "bwrap") -> str:
  """One line saying what `isolation` gives on this machine; raises IsolationUnavailable (naming
  rl.code.isolation) when "bwrap" cannot be set up, ValueError for an unknown name."""
  global _probe_result
  if isolation not in ISOLATIONS:
    raise ValueError(f"rl.code.isolation = {isolation!r}; expected one of {ISOLATIONS}")
  if isolation == "none":
    return ("none: model-written code runs as this user with rlimits only "
            "(rl.code.isolation = \"none\" accepts that risk)")
  if _probe_result is None:
    try:
      version = _bwrap_version()
      _seccomp_program()
      probe = run_python("import os\nprint(os.getuid(), len(os.listdir('/proc')) > 0)",
                         isolation="bwrap")
      if probe.reason != "ok" or probe.stdout.split() != [str(_NOBODY), "True"]:
        raise IsolationUnavailable(f"a test run failed ({probe.reason}): {probe.stderr.strip()[-300:]}")
    except IsolationUnavailable as e:
      raise IsolationUnavailable(
          f"code rewards need OS isolation and bwrap cannot provide it here: {e}. Fix that (see "
          "docs/security.md), or set rl.code.isolation = \"none\" to run model-written code "
          "without isolation, accepting the risk") from None
    _probe_result = (f"bwrap ({version}): user, mount, pid, net, ipc, uts and cgroup namespaces, "
                     f"seccomp ({len(_DENIED_SYSCALLS) + 1} calls refused), read-only runtime "
                     f"({len(_runtime_files())} paths), tmpfs /work, uid nobody"
                     + (", started via setpriv (trainer is root)" if os.geteuid() == 0 else ""))
  return _probe_result


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
  if "[Errno 27] File too large" in stderr:   # Python ignores SIGXFSZ, so the write fails instead
    return "output/file size limit"
  if returncode != 0:
    last_line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return f"runtime error: {last_line[:200]}" if last_line else f"exit code {returncode}"
  return "ok"


def _read_fd(fd: int, limit_bytes: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  return os.read(fd, limit_bytes).decode("utf-8", errors="replace")


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
  """Whether process pid exited (or was gone) within timeout_s; it is not reaped."""
  try:
    pidfd = os.pidfd_open(pid)
  except ProcessLookupError:
    return True
  try:
    return bool(select.select([pidfd], [], [], max(timeout_s, 0.0))[0])
  finally:
    os.close(pidfd)


def _kill(pid: int, sig: int, group: bool = False) -> None:
  try:
    (os.killpg if group else os.kill)(pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def _sandbox_pid(info_fd: int) -> int | None:
  """The host pid of the sandbox's pid-namespace init, from bwrap's --info-fd JSON."""
  text = _read_fd(info_fd, 4096)
  try:
    return int(json.loads(text)["child-pid"])
  except (ValueError, KeyError):
    return None


def run_python(code: str, stdin: str = "", limits: Limits = Limits(), isolation: str = "bwrap",
               job: str | None = None) -> SandboxResult:
  """Runs a Python program (standard library only) under `isolation` (module docstring).

  Args:
    code: the program source, run as __main__ (file solution.py).
    stdin: text fed to its standard input.
    limits: per-run limits (Limits).
    isolation: "bwrap" (OS isolation) or "none" (rlimits only; see check_isolation).
    job: None runs the program alone; a JSON job ({"tests": [{"setup", "expressions"}],
      "stop_at_first_failure"}) runs it, then evaluates those expressions and writes their encoded
      values to stdout (cftjax.rewards.sandbox_child).
  """
  if isolation not in ISOLATIONS:
    raise ValueError(f"rl.code.isolation = {isolation!r}; expected one of {ISOLATIONS}")
  child_source = _child_source()
  config = {"mode": "program" if job is None else "values", "cpu_s": max(1, math.ceil(limits.cpu_s)),
            "memory_bytes": limits.memory_mb << 20, "file_bytes": limits.output_mb << 20,
            "open_files": limits.open_files, "max_processes": limits.max_processes}
  fds: list[int] = []
  root = None
  try:
    stdin_fd, stdout_fd, stderr_fd, info_fd = (_data_fd(stdin.encode()), _data_fd(b""),
                                               _data_fd(b""), _data_fd(b""))
    fds += [stdin_fd, stdout_fd, stderr_fd, info_fd]
    sources = {"child.py": child_source, "solution.py": code.encode(),
               "job.json": (job or "").encode()}
    if isolation == "bwrap":
      _bwrap_version()
      files = {f"/sandbox/{name}": _data_fd(data) for name, data in sources.items()}
      seccomp_fd = _data_fd(_seccomp_program())
      fds += [*files.values(), seccomp_fd]
      # The run's pid 1 ends it when this pipe's write end (this process's only) closes.
      lifeline_read, lifeline_write = os.pipe()
      fds += [lifeline_read, lifeline_write]
      os.set_inheritable(lifeline_read, True)
      config.update(lifeline_fd=lifeline_read, work_dir="/work", solution_path="/sandbox/solution.py",
                    job_path="/sandbox/job.json")
      command = _bwrap_command(files, seccomp_fd, info_fd, limits.disk_mb,
                               ["/sandbox/child.py", json.dumps(config)])
      cwd, env, pass_fds = "/", {}, (*files.values(), seccomp_fd, info_fd, lifeline_read)
    else:
      root = tempfile.mkdtemp(prefix="cftjax_sandbox_")
      for name, data in sources.items():
        with open(os.path.join(root, name), "wb") as f:
          f.write(data)
      work = os.path.join(root, "work")
      os.mkdir(work)
      config.update(lifeline_fd=None, work_dir=work, solution_path=os.path.join(root, "solution.py"),
                    job_path=os.path.join(root, "job.json"))
      command = [_interpreter(), "-I", "-S", "-B", os.path.join(root, "child.py"), json.dumps(config)]
      cwd, env, pass_fds = work, {"HOME": work, "TMPDIR": work}, ()
    process = subprocess.Popen(command, stdin=stdin_fd, stdout=stdout_fd, stderr=stderr_fd,
                               cwd=cwd, env=env, pass_fds=pass_fds, start_new_session=True)
    timed_out = not _wait_for_exit(process.pid, limits.wall_s)
    sandbox_pid = _sandbox_pid(info_fd) if isolation == "bwrap" else None
    if timed_out and sandbox_pid is not None:
      # Killing the namespace's pid 1 kills everything in it; bwrap then reaps it and exits.
      _kill(sandbox_pid, signal.SIGKILL)
      _wait_for_exit(process.pid, _TEARDOWN_S)
    _kill(process.pid, signal.SIGKILL, group=True)   # whatever is left (without isolation: all)
    process.wait()
    if sandbox_pid is not None and not _wait_for_exit(sandbox_pid, _TEARDOWN_S):
      logger.warning("sandbox: pid %d still running %.0fs after its run was killed", sandbox_pid,
                     _TEARDOWN_S)
    limit_bytes = (limits.output_mb << 20) + 1
    stdout = _read_fd(stdout_fd, limit_bytes)
    stderr = _read_fd(stderr_fd, limit_bytes)
    returncode = process.returncode
    if isolation == "bwrap" and returncode > 128:   # the reaper reports death by signal N as 128 + N
      returncode = 128 - returncode
    reason = _failure_reason(returncode, stderr, timed_out)
    return SandboxResult(stdout=stdout, stderr=stderr[-_STDERR_TAIL_CHARS:],
                         returncode=returncode, timed_out=timed_out, reason=reason,
                         isolation=isolation)
  finally:
    for fd in fds:
      os.close(fd)
    if root is not None:
      shutil.rmtree(root, ignore_errors=True)
