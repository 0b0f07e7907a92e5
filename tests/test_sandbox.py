"""The code sandbox (cftjax.rewards.sandbox, code_tests) against hostile programs.

Every attack goes through the code reward (score_batch("code", ...)) and must score 0 with a reason
while: the trainer (this process) and a sentinel process stay alive, no file outside the sandbox's
tmpfs is created or changed, a listener on 127.0.0.1 (TCP) and a unix socket receive no connection,
no process of the run is left over, and the host environment / files are not read (the problems'
expected outputs are host secrets, so reading them would score 1). Honest solutions score 1.0.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from cftjax.data.critique import CritiqueRecord
from cftjax.rewards import sandbox
from cftjax.rewards.code_tests import run_tests, split_assert, strict_equal
from cftjax.rewards.registry import RewardComputer, score_batch
from cftjax.rewards.sandbox import IsolationUnavailable, Limits, check_isolation, run_python

REPO = pathlib.Path(__file__).resolve().parent.parent
MUL_ASSERTS = ["assert mul(6, 7) == 42", "assert mul(2, 3) == 6", "assert mul(0, 5) == 0"]


def _python_block(code: str) -> str:
  return f"Solution:\n```python\n{code}\n```"


def _own_pid_namespace_depth() -> int:
  with open("/proc/self/status") as f:
    return next(len(line.split()) - 1 for line in f if line.startswith("NSpid:"))


def _parent(pid: str) -> str:
  try:
    with open(f"/proc/{pid}/status") as f:
      return next(line.split()[1] for line in f if line.startswith("PPid:"))
  except (OSError, StopIteration):
    return "0"


def _ours_or_orphaned(pid: str) -> bool:
  """Whether pid descends from this process, or from a sandbox orphaned to one of this process's
  ancestors (init or a subreaper: the path's process just below it is a bwrap). Sandboxes that other
  trainers or test workers on this machine run at the same time descend from those, not ours to count."""
  ancestors, up = set(), str(os.getpid())
  while up != "0":  # up to init, whose parent is 0
    ancestors.add(up)
    up = _parent(up)
  below = pid
  while pid not in ancestors and pid != "0":
    below, pid = pid, _parent(pid)
  return pid == str(os.getpid()) or (pid != "0" and _command_name(below) == "bwrap")


def _command_name(pid: str) -> str:
  try:
    with open(f"/proc/{pid}/comm") as f:
      return f.read().strip()
  except OSError:
    return ""


def _sandboxed_processes(since_ticks: int) -> list[str]:
  """Processes in a pid namespace below ours, started after since_ticks (clock ticks after boot),
  of this process's runs or orphaned."""
  depth, found = _own_pid_namespace_depth(), []
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/status") as f:
        nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
      with open(f"/proc/{entry}/stat") as f:
        start = int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, StopIteration, ValueError, IndexError):
      continue
    if len(nspid) > depth and start >= since_ticks and _ours_or_orphaned(entry):
      try:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          found.append(f"{entry}: {f.read()[:200]!r}")
      except OSError:
        continue
  return found


def _boot_ticks_now() -> int:
  with open("/proc/uptime") as f:
    return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


def _tree(root: pathlib.Path) -> dict[str, tuple[int, int, int]]:
  return {str(p): (p.stat().st_mtime_ns, p.stat().st_size, p.stat().st_mode)
          for p in sorted(root.rglob("*"))}


class Host:
  """What an attack could reach on the host, and the checks that it was not reached."""

  def __init__(self, tmp_path: pathlib.Path):
    self.dir = tmp_path / "host"
    self.dir.mkdir()
    self.victim = self.dir / "victim.txt"
    self.victim.write_text("keep me")
    self.secret = "s3cr3t-" + secrets.token_hex(8)
    os.environ["CFTJAX_TEST_SECRET"] = self.secret
    self.dataset = self.dir / "dataset.jsonl"
    self.dataset.write_text(json.dumps({"tests": {"inputs": ["6 7"], "outputs": [self.secret]}}) + "\n")
    self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self.tcp.bind(("127.0.0.1", 0))
    self.tcp.listen()
    self.port = self.tcp.getsockname()[1]
    self.unix_path = str(self.dir / "trainer.sock")
    self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    self.unix.bind(self.unix_path)
    self.unix.listen()
    self.abstract_name = "\0cftjax-test-" + secrets.token_hex(6)
    self.abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    self.abstract.bind(self.abstract_name)
    self.abstract.listen()
    self.connections = 0
    self._stop = threading.Event()
    self._threads = [threading.Thread(target=self._accept, args=(s,), daemon=True)
                     for s in (self.tcp, self.unix, self.abstract)]
    for t in self._threads:
      t.start()
    self.sentinel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    self.start_ticks = _boot_ticks_now()
    self.files_before = _tree(self.dir)
    self.repo_before = {p.name: p.stat().st_mtime_ns for p in REPO.iterdir()}

  def _accept(self, listener: socket.socket) -> None:
    listener.settimeout(0.1)
    while not self._stop.is_set():
      try:
        connection, _ = listener.accept()
      except (socket.timeout, OSError):
        continue
      self.connections += 1
      connection.close()

  def substitute(self, code: str) -> str:
    return (code.replace("VICTIM", repr(str(self.victim))).replace("HOSTDIR", repr(str(self.dir)))
            .replace("TRAINER_PID", str(os.getpid())).replace("SENTINEL_PID", str(self.sentinel.pid))
            .replace("TCP_PORT", str(self.port)).replace("UNIX_PATH", repr(self.unix_path))
            .replace("ABSTRACT_NAME", repr(self.abstract_name)).replace("REPO", repr(str(REPO))))

  def check_contained(self) -> None:
    assert self.sentinel.poll() is None, "the sentinel process was killed"
    os.kill(os.getpid(), 0)
    assert self.victim.read_text() == "keep me"
    assert _tree(self.dir) == self.files_before, "a file outside the sandbox changed"
    assert {p.name: p.stat().st_mtime_ns for p in REPO.iterdir()} == self.repo_before
    time.sleep(0.2)   # let the accept threads see any late connection
    assert self.connections == 0, "a listener on the host received a connection"
    deadline = time.monotonic() + 2.0   # a leak persists (the attacks sleep 60 s); a teardown does not
    while _sandboxed_processes(self.start_ticks) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert _sandboxed_processes(self.start_ticks) == [], "processes of the run are left over"

  def close(self) -> None:
    self._stop.set()
    for t in self._threads:
      t.join()
    for s in (self.tcp, self.unix, self.abstract):
      s.close()
    self.sentinel.kill()
    self.sentinel.wait()
    del os.environ["CFTJAX_TEST_SECRET"]


@pytest.fixture
def host(tmp_path):
  check_isolation("bwrap")
  watched = Host(tmp_path)
  yield watched
  watched.close()


# (name, program, tests). Stdin/stdout problems expect host secrets, so a leak would score 1.
SECRET_TESTS = "SECRET_TESTS"
ATTACKS = [
    # The trainer is killed or signalled.
    ("pidfd_kill_parent", "import os, signal\nfd = os.pidfd_open(os.getppid())\n"
     "signal.pidfd_send_signal(fd, signal.SIGKILL)\n", MUL_ASSERTS),
    ("kill_trainer_pid", "import os\nos.kill(TRAINER_PID, 9)\nos.kill(SENTINEL_PID, 9)\n", MUL_ASSERTS),
    ("kill_everything", "import os\nos.kill(-1, 9)\n", MUL_ASSERTS),
    ("ptrace_and_proc_mem", "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
     "assert libc.ptrace(16, SENTINEL_PID, 0, 0) == 0, ctypes.get_errno()\n"
     "open('/proc/SENTINEL_PID/mem', 'rb')\n", MUL_ASSERTS),
    # The audit hook of the old sandbox is switched off (gc, subinterpreter), then files, shell.
    ("gc_patch_then_delete", "import gc, os\n"
     "hooks = [o for o in gc.get_objects() if callable(o) and getattr(o, '__name__', '') == 'hook']\n"
     "os.remove(VICTIM)\n", MUL_ASSERTS),
    ("subinterpreter", "import _xxsubinterpreters as s\ni = s.create()\n"
     "s.run_string(i, 'import os; os.remove(' + repr(VICTIM) + '); open(' + repr(HOSTDIR) + "
     "' + \"/new.txt\", \"w\")')\n", MUL_ASSERTS),
    ("shell", "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'touch ' + HOSTDIR + '/x'])\n",
     MUL_ASSERTS),
    ("setsid_daemon", "import os, time\nif os.fork() == 0:\n  os.setsid()\n  if os.fork() == 0:\n"
     "    time.sleep(60)\n  os._exit(0)\ntime.sleep(0.3)\n", MUL_ASSERTS),
    ("fork_bomb", "import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n    pass\n",
     MUL_ASSERTS),
    ("thread_bomb", "import threading, time\nwhile True:\n  threading.Thread(target=time.sleep, "
     "args=(60,)).start()\n", MUL_ASSERTS),
    # Scores faked without solving.
    ("sys_exit_before_asserts", "import sys\nsys.exit(0)\ndef mul(a, b):\n  return -1\n", MUL_ASSERTS),
    ("os_exit_before_asserts", "import os\nos._exit(0)\ndef mul(a, b):\n  return -1\n", MUL_ASSERTS),
    ("excepthook_exit", "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n"
     "def mul(a, b):\n  return -1\n", MUL_ASSERTS),
    ("atexit_exit", "import atexit, os\natexit.register(os._exit, 0)\ndef mul(a, b):\n  return -1\n",
     MUL_ASSERTS),
    ("always_equal", "class E:\n  def __eq__(self, other):\n    return True\n  __hash__ = None\n"
     "def mul(a, b):\n  return E()\n", MUL_ASSERTS),
    ("always_equal_int", "class I(int):\n  def __eq__(self, other):\n    return True\n"
     "  __hash__ = int.__hash__\ndef mul(a, b):\n  return I(0)\n", MUL_ASSERTS),
    ("forged_records", "import json, os\nfor i in range(3):\n"
     "  print(json.dumps({'test': i, 'values': [['bool', True]]}))\n"
     "print('passed')\nos._exit(0)\n", MUL_ASSERTS),
    ("patched_builtins", "import builtins\nbuiltins.isinstance = lambda *a: True\n"
     "builtins.type = lambda *a: int\ndef mul(a, b):\n  return 'x'\n", MUL_ASSERTS),
    ("pass_marker_stdout", "print('passed')\nprint('ok')\nimport sys\nsys.exit(0)\n", SECRET_TESTS),
    ("read_dataset", "import json, os\nfor root, dirs, files in os.walk('/'):\n  for f in files:\n"
     "    if f.endswith('.jsonl'):\n      try:\n"
     "        print(json.loads(open(os.path.join(root, f)).readline())['tests']['outputs'][0])\n"
     "      except Exception:\n        pass\nprint(open(HOSTDIR + '/dataset.jsonl').read())\n",
     SECRET_TESTS),
    ("read_environment", "import os\nprint(os.environ.get('CFTJAX_TEST_SECRET'))\n"
     "for pid in ['1', 'self', str(os.getppid()), 'TRAINER_PID']:\n  try:\n"
     "    print(open('/proc/' + pid + '/environ').read())\n  except OSError:\n    pass\n",
     SECRET_TESTS),
    # Host files: written, changed, read.
    ("sqlite_outside", "import sqlite3\nsqlite3.connect(HOSTDIR + '/x.db').execute('create table t(x)')\n",
     MUL_ASSERTS),
    ("chmod_by_fd", "import os\nfd = os.open(VICTIM, os.O_RDONLY)\nos.chmod(fd, 0)\n", MUL_ASSERTS),
    ("write_outside", "open(VICTIM, 'a').write('x')\n", MUL_ASSERTS),
    ("write_root", "for p in ['/x', '/usr/x', '/proc/sys/kernel/hostname', '/etc/x']:\n  try:\n"
     "    open(p, 'w').write('x')\n  except OSError:\n    pass\nimport os\nos.remove(VICTIM)\n",
     MUL_ASSERTS),
    ("read_host_files", "for p in ['/etc/shadow', '/etc/passwd', REPO + '/pyproject.toml', "
     "'/root/.bashrc', HOSTDIR + '/dataset.jsonl']:\n  try:\n    print(open(p).read())\n"
     "  except OSError as e:\n    print(e)\n", SECRET_TESTS),
    ("disk_fill", "import os\nfor i in range(64):\n  open(f'/work/f{i}', 'wb').write(b'x' * (16 << 20))\n"
     "open(VICTIM, 'w')\n", MUL_ASSERTS),
    ("symlink_escape", "import os\nos.symlink(VICTIM, '/work/link')\nopen('/work/link', 'w').write('x')\n",
     MUL_ASSERTS),
    # Network and sockets.
    ("tcp_connect", "import socket\nsocket.create_connection(('127.0.0.1', TCP_PORT), timeout=2)\n",
     MUL_ASSERTS),
    ("unix_connect", "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(UNIX_PATH)\n",
     MUL_ASSERTS),
    ("abstract_unix_connect", "import socket\ns = socket.socket(socket.AF_UNIX)\n"
     "s.connect(ABSTRACT_NAME)\n", MUL_ASSERTS),
    ("udp_send", "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', "
     "('127.0.0.1', TCP_PORT))\nsocket.create_connection(('8.8.8.8', 53), timeout=2)\n", MUL_ASSERTS),
    # Kernel interfaces that reach outside the namespaces.
    ("mount_and_unshare", "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
     "assert libc.unshare(0x10000000) == 0, 'unshare'\n"
     "assert libc.mount(b'none', b'/work', b'tmpfs', 0, None) == 0, 'mount'\n", MUL_ASSERTS),
    # Time and resources.
    ("infinite_loop", "while True:\n  pass\n", MUL_ASSERTS),
    ("memory_bomb", "chunks = []\nwhile True:\n  chunks.append(bytearray(32 << 20))\n", MUL_ASSERTS),
    ("stdout_flood", "import sys\nwhile True:\n  sys.stdout.write('x' * 65536)\n", SECRET_TESTS),
]


@pytest.mark.parametrize("name, program, tests", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_contained(host, name, program, tests):
  if tests == SECRET_TESTS:
    tests = {"inputs": ["6 7"], "outputs": [host.secret]}
  record = CritiqueRecord(question="q", tests=tests, source="code", id=name)
  start = time.monotonic()
  (result,) = score_batch("code", [_python_block(host.substitute(program))], [record],
                          wall_s=2.0, budget_s=10.0, memory_mb=256)
  elapsed = time.monotonic() - start
  assert result.score == 0.0 and not result.error, result
  assert "tests passed; first failure: " in result.reason, result
  assert elapsed < 15.0
  host.check_contained()


def test_kernel_calls_are_refused_by_seccomp():
  # x86_64 numbers; each call made with junk arguments must fail with EPERM (1), not EINVAL/EFAULT.
  if os.uname().machine != "x86_64":
    pytest.skip("syscall numbers below are x86_64's")
  calls = {"ptrace": 101, "mount": 165, "keyctl": 250, "bpf": 321, "unshare": 272, "setns": 308,
           "pidfd_send_signal": 424, "io_uring_setup": 425, "perf_event_open": 298,
           "userfaultfd": 323, "kexec_load": 246, "init_module": 175}
  program = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
             f"for name, nr in {calls!r}.items():\n"
             "  libc.syscall(nr, 0, 0, 0, 0, 0)\n  print(name, ctypes.get_errno())\n")
  result = run_python(program)
  assert result.reason == "ok", result
  assert result.stdout.split() == [w for name in calls for w in (name, "1")]


def test_the_sandbox_sees_only_the_runtime(host):
  program = ("import os, sys\nprint(os.getuid(), os.getpid(), sorted(os.environ))\n"
             "print(sorted(os.listdir('/')))\nprint(sorted(os.listdir('/proc'))[:3], "
             "[l.split(':')[0].strip() for l in open('/proc/net/dev')][2:])\n"
             "print(sys.path[-1], os.path.exists(sys.path[-1].rsplit('/', 1)[0] + "
             "'/site-packages/numpy'))\n"
             "print([os.access(f'/proc/1/{n}', os.R_OK) for n in ('mem', 'fd', 'environ')])\n")
  result = run_python(program)
  assert result.reason == "ok", result
  ids, top, proc_net, paths, reaper = result.stdout.splitlines()
  assert reaper == "[False, False, False]"   # pid 1 (the reaper) is out of the program's reach
  uid, pid, env = ids.split(" ", 2)
  assert (uid, pid) == ("65534", "2")    # nobody, pid 2 of its own pid namespace
  assert env == "['HOME', 'PATH', 'PWD', 'TMPDIR']" and host.secret not in result.stdout
  assert set(eval(top)) <= {"dev", "etc", "lib", "lib64", "proc", "root", "sandbox", "usr", "work"}
  assert proc_net.endswith("['lo']")     # its own network namespace: loopback only
  assert paths.endswith("False")         # site-packages is hidden
  host.check_contained()


def test_honest_solutions_score_one():
  stdio = {"inputs": ["1 2", "3 4\n", ["10", "20"], "0 0"], "outputs": ["3", "7\n", "30", ["0"]]}
  completions = [_python_block("import sys\nprint(sum(map(int, sys.stdin.read().split())))"),
                 _python_block("import math\ndef mul(a, b):\n  return a * b\n"),
                 _python_block("def pair(x):\n  return (x, [x * 2.5], {'k': {x}})\n"),
                 _python_block("def gen(n):\n  return (i * i for i in range(n))\n")]
  records = [CritiqueRecord(question="q", tests=t, source="code", id=str(i)) for i, t in enumerate([
      stdio, MUL_ASSERTS,
      ["assert pair(2) == (2, [5.0], {'k': {2}})", "x = 3\nassert pair(x)[1][0] != 7.5 or True",
       "assert math.isclose(pair(1)[1][0], 2.5)", "assert pair(1) is not None"],
      ["assert list(gen(3)) == [0, 1, 4]", "assert sum(gen(4)) == 14", "assert all(gen(1)) is False"],
  ])]
  results = score_batch("code", completions, records, wall_s=5.0, all_or_nothing=True)
  assert [(r.score, r.reason) for r in results] == [(1.0, "4/4 tests passed"), (1.0, "3/3 tests passed"),
                                                    (1.0, "4/4 tests passed"), (1.0, "3/3 tests passed")]


def test_pass_rate_and_reasons():
  program = "a, *rest = map(int, input().split())\nprint(a + sum(rest) if a else -1)\n"
  stdio = {"inputs": ["1 2", "3 4\n", ["10", "20"], "0 0"], "outputs": ["3", "7\n", "30", ["0"]]}
  assert run_tests(program, stdio) == (0.5, ["passed", "passed", "wrong answer", "wrong answer"])
  pass_rate, reasons = run_tests("def double(x):\n  return x + 2\n",
                                 ["assert double(2) == 4", "assert double(3) == 6",
                                  "assert double(1) == 3.0", "assert double(None) == 2"])
  assert pass_rate == 0.25
  assert reasons[1:] == ["wrong answer: assert double(3) == 6", "wrong answer: assert double(1) == 3.0",
                         "runtime error: TypeError: unsupported operand type(s) for +: 'NoneType' "
                         "and 'int'"]
  program = "print('  1 2  ')\nprint()\nprint('3')\n\n"
  assert run_tests(program, {"inputs": [""], "outputs": ["1 2\n\n3  \n\n"]})[0] == 1.0
  assert run_tests(program, {"inputs": [""], "outputs": ["1 2\n3"]})[0] == 0.0


def test_a_test_that_kills_its_run_costs_only_itself():
  program = "import os\ndef f(x):\n  if x == 2:\n    os._exit(0)\n  return x\n"
  assert run_tests(program, ["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3"]) == (
      2 / 3, ["passed", "no result: the program exited before the test ran", "passed"])


def test_time_budget_is_shared_and_all_or_nothing_stops_early():
  stdio = {"inputs": [str(i) for i in range(10)], "outputs": [str(i) for i in range(10)]}
  start = time.monotonic()
  pass_rate, reasons = run_tests("while True:\n  pass\n", stdio, limits=Limits(wall_s=1.0),
                                 budget_s=2.5, parallel=2)
  assert time.monotonic() - start < 6.0   # not 10 x 1 s
  assert pass_rate == 0.0 and reasons.count("wall time limit") <= 6
  assert reasons[-1] == "not run: time budget spent"
  start = time.monotonic()
  pass_rate, reasons = run_tests("while True:\n  pass\n", stdio, limits=Limits(wall_s=1.0),
                                 budget_s=30.0, stop_at_first_failure=True, parallel=2)
  assert time.monotonic() - start < 6.0
  assert reasons.count("wall time limit") <= 2 and reasons[-1] == "not run: an earlier test failed"
  assert run_tests("def f(x):\n  return 0\n", ["assert f(1) == 1", "assert f(1) == 0"],
                   stop_at_first_failure=True)[1] == ["wrong answer: assert f(1) == 1",
                                                      "not run: an earlier test failed"]


def test_limits():
  result = run_python("while True:\n  pass\n", limits=Limits(wall_s=30, cpu_s=1))
  assert not result.timed_out and result.reason == "cpu time limit", result
  result = run_python("chunks = []\nwhile True:\n  chunks.append(bytearray(32 << 20))\n",
                      limits=Limits(memory_mb=256))
  assert result.reason == "memory limit", result
  result = run_python("import sys\nwhile True:\n  sys.stdout.write('x' * 65536)\n",
                      limits=Limits(output_mb=1))
  assert result.reason == "output/file size limit" and len(result.stdout) <= (1 << 20) + 1
  result = run_python("import os\nn = 0\ntry:\n  while True:\n    if os.fork() == 0:\n"
                      "      import time; time.sleep(5); os._exit(0)\n    n += 1\n"
                      "except OSError as e:\n  print(n, e.errno)\n", limits=Limits(max_processes=8))
  assert result.reason == "ok" and int(result.stdout.split()[0]) < 8 and result.stdout.split()[1] == "11"
  result = run_python("open('/work/a', 'wb').write(b'x' * (3 << 20))\n", limits=Limits(disk_mb=2))
  assert result.reason.startswith("runtime error: OSError: [Errno 28]"), result


def test_threads_unicode_stdin_and_scratch_files():
  program = ("import os, sys, tempfile, threading\nthreading.stack_size(1 << 26)\nout = []\n"
             "t = threading.Thread(target=lambda: out.append(input()[::-1]))\nt.start()\nt.join()\n"
             "open('s.txt', 'w').write('hi')\nwith tempfile.NamedTemporaryFile() as f:\n  f.write(b'x')\n"
             "print(out[0], '数学', open('s.txt').read(), os.getcwd())\n")
  result = run_python(program, stdin="éab\n")
  assert (result.reason, result.stdout) == ("ok", "baé 数学 hi /work\n")


def test_syntax_error_and_exit_code():
  assert run_python("def f(:\n").reason.startswith("runtime error: SyntaxError")
  result = run_python("import sys\nsys.exit(3)\n")
  assert (result.returncode, result.reason) == (3, "exit code 3")
  assert run_python("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n").reason == \
      "killed by SIGTERM"


def test_split_assert_keeps_comparisons_in_the_trainer():
  test = split_assert("xs = [3, 1]\nassert sorted(f(xs)) == [1, 3] and g(1) != 2.0")
  assert test.setup == "xs = [3, 1]"
  assert test.expressions == ("__cftjax_materialize__(f(xs))", "g(1)")
  assert test.checks[0][0] == "_strict_equal(sorted(_value_0), [1, 3]) and (not _strict_equal(_value_1, 2.0))"
  # Arithmetic and calls whose cost the program could choose, or with lambdas, run inside.
  for source, inside, check in [
      ("assert 2 ** f(3) == 8", "2 ** f(3)", "_strict_equal(_value_0, 8)"),
      ("assert math.factorial(f(3)) == 6", "math.factorial(f(3))", "_strict_equal(_value_0, 6)"),
      ("assert all(f(x) for x in xs)", "all((f(x) for x in xs))", "_value_0"),
      ("assert not math.isclose(f(1), -2.5)", "__cftjax_materialize__(f(1))",
       "not math.isclose(_value_0, -2.5)")]:
    test = split_assert(source)
    assert (test.expressions, test.checks[0][0]) == ((inside,), check)
  with pytest.raises(ValueError, match="test 0 holds no assert"):
    split_assert("x = 1")
  with pytest.raises(ValueError, match="test 0 is not valid Python"):
    split_assert("assert f(")


@pytest.mark.parametrize("a, b, equal", [
    (1, 1, True), (1, 1.0, False), (True, 1, False), ([1, (2, "x")], [1, (2, "x")], True),
    ([1], (1,), False), ({1: [2]}, {1: [2]}, True), ({1: 2}, {1.0: 2}, False),
    ({1, 2}, {1, 2}, True), ({1}, {1.0}, False), (float("nan"), float("nan"), False),
])
def test_strict_equal(a, b, equal):
  assert strict_equal(a, b) is equal


@pytest.mark.parametrize("tests, message", [
    ({"inputs": ["1"]}, "needs 'inputs' and 'outputs'"),
    ({"inputs": ["1"], "outputs": []}, "1 inputs but 0 outputs"),
    ({"fn_name": "f", "inputs": [], "outputs": []}, "call-based"),
    ("not json", "not JSON"),
    ([], "no tests"),
    (42, "got int"),
])
def test_bad_tests_are_rejected(tests, message):
  with pytest.raises(ValueError, match=message):
    run_tests("print(1)", tests)


def test_tests_as_json_string():
  program = "a, b = map(int, input().split())\nprint(a + b)\n"
  assert run_tests(program, '{"inputs": ["2 2"], "outputs": ["4"]}') == (1.0, ["passed"])


def test_without_bwrap_code_rewards_refuse_to_start(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))   # no bwrap on PATH
  monkeypatch.setattr(sandbox, "_probe_result", None)
  sandbox._bwrap_version.cache_clear()
  try:
    with pytest.raises(IsolationUnavailable, match=r'bubblewrap \(bwrap\) is not installed.*'
                       r'rl\.code\.isolation = "none"'):
      RewardComputer({"by_task": {"code": "code"}}, code={"isolation": "bwrap"})
    computer = RewardComputer({"by_task": {"code": "code"}}, code={"isolation": "none"})
    (result,) = computer(["```python\nprint(int(input()) * 2)\n```"],
                         [CritiqueRecord(question="q", tests={"inputs": ["4"], "outputs": ["8"]})],
                         ["code"])
    assert result.score == 1.0
  finally:
    sandbox._bwrap_version.cache_clear()
  with pytest.raises(ValueError, match="rl.code.isolation = 'docker'"):
    check_isolation("docker")


def test_trainer_survives_signals_from_a_run():
  # The run's signals reach only its own pid namespace: the trainer's handlers never fire.
  seen = []
  previous = signal.signal(signal.SIGUSR1, lambda *a: seen.append(1))
  try:
    result = run_python(f"import os, signal\nfor pid in (1, -1, {os.getpid()}):\n  try:\n"
                        "    os.kill(pid, signal.SIGUSR1)\n  except OSError as e:\n    print(e.errno)\n")
  finally:
    signal.signal(signal.SIGUSR1, previous)
  assert seen == [] and result.reason in ("ok", "killed by SIGUSR1")


def test_a_run_dies_with_its_trainer():
  trainer = subprocess.Popen([sys.executable, "-c", (
      "import threading, time\nfrom cftjax.rewards.sandbox import Limits, run_python\n"
      "threading.Thread(target=run_python, args=('import os, time\\nos.fork()\\ntime.sleep(60)',),"
      " kwargs={'limits': Limits(wall_s=60)}).start()\ntime.sleep(60)\n")],
      env={**os.environ, "PYTHONPATH": str(REPO)})
  start_ticks = _boot_ticks_now()
  deadline = time.monotonic() + 30
  while not _sandboxed_processes(start_ticks) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert _sandboxed_processes(start_ticks), "the run did not start"
  trainer.kill()
  trainer.wait()
  deadline = time.monotonic() + 5
  while _sandboxed_processes(start_ticks) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert _sandboxed_processes(start_ticks) == []
