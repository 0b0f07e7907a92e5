"""Tests for cftjax.rewards.sandbox: hostile programs are contained and score 0; correct ones score 1."""

from __future__ import annotations

import os
import socket

import pytest

from cftjax.rewards.sandbox import run_python, run_tests

ADD_TWO = "a, b = map(int, input().split())\nprint(a + b)\n"
STDIN_TESTS = {"inputs": ["1 2", "3 4\n", ["10", "20"], "0 0"], "outputs": ["3", "7\n", "30", ["0"]]}


def test_correct_solution_scores_one():
  program = "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n"
  assert run_tests(program, STDIN_TESTS) == (1.0, ["passed"] * 4)
  assert run_tests("def double(x):\n  return 2 * x\n", ["assert double(2) == 4", "assert double(0) == 0"]) \
      == (1.0, ["passed", "passed"])


def test_half_correct_solution_scores_half():
  # Reads only the first line: the ["10", "20"] case fails; "0 0" fails by a deliberate bug.
  program = "a, *rest = map(int, input().split())\nprint(a + sum(rest) if a else -1)\n"
  pass_rate, reasons = run_tests(program, STDIN_TESTS)
  assert pass_rate == 0.5
  assert reasons[0] == reasons[1] == "passed"
  assert reasons[2] == "wrong answer" and reasons[3] == "wrong answer"
  pass_rate, reasons = run_tests("def double(x):\n  return x + 2\n",
                                 ["assert double(2) == 4", "assert double(3) == 6"])
  assert (pass_rate, reasons[1]) == (0.5, "runtime error: AssertionError")


def test_outputs_compared_line_by_line_after_stripping():
  program = "print('  1 2  ')\nprint()\nprint('3')\n\n"
  assert run_tests(program, {"inputs": [""], "outputs": ["1 2\n\n3  \n\n"]})[0] == 1.0
  assert run_tests(program, {"inputs": [""], "outputs": ["1 2\n3"]})[0] == 0.0


def test_infinite_loop_hits_wall_limit():
  result = run_python("while True:\n  pass\n", wall_s=0.5, cpu_s=30)
  assert result.timed_out and result.reason == "wall time limit"
  assert run_tests("while True: pass", {"inputs": ["x"], "outputs": ["y"]}, wall_s=0.5) \
      == (0.0, ["wall time limit"])


def test_cpu_limit():
  result = run_python("while True:\n  pass\n", wall_s=30, cpu_s=1)
  assert not result.timed_out and result.reason == "cpu time limit"


def test_memory_bomb():
  program = "chunks = []\nwhile True:\n  chunks.append(bytearray(32 << 20))\n"
  result = run_python(program, memory_mb=256)
  assert result.reason == "memory limit" and result.returncode != 0
  assert run_tests(program, ["assert True"], memory_mb=256) == (0.0, ["memory limit"])


@pytest.mark.parametrize("program, blocked", [
    ("import os\nwhile True:\n  os.fork()\n", "os.fork"),
    ("import os\nos.system(':(){ :|:& };:')\n", "os.system"),
    ("import subprocess\nsubprocess.run(['sh', '-c', 'sleep 100 &'])\n", "import _posixsubprocess"),
    ("import ctypes\n", "import ctypes"),
])
def test_process_creation_is_refused(program, blocked):
  result = run_python(program, wall_s=5)
  assert result.reason == f"blocked: {blocked}"
  assert run_tests(program, ["assert True"], wall_s=5)[0] == 0.0


def test_parent_environment_is_invisible(monkeypatch):
  monkeypatch.setenv("CFTJAX_TEST_SECRET", "s3cr3t-value")
  result = run_python("import os\nprint(sorted(os.environ))\n")
  assert result.reason == "ok"
  assert "CFTJAX_TEST_SECRET" not in result.stdout and "s3cr3t" not in result.stdout
  # LC_CTYPE is set by the child interpreter itself (PEP 538 C-locale coercion).
  assert result.stdout.strip() == "['HOME', 'LC_CTYPE', 'TMPDIR']"
  # Reading the parent's environment through /proc (any spelling of the path) is refused too.
  for path in ("f'/proc/{os.getppid()}/environ'", f"'/proc/{os.getpid()}/environ'",
               f"'/dev/fd/../../{os.getpid()}/environ'"):
    result = run_python(f"import os\nprint(open({path}, 'rb').read())\n")
    assert result.reason.startswith("blocked: reading") and "s3cr3t" not in result.stdout


def test_writes_outside_the_work_dir_are_refused(tmp_path):
  victim = tmp_path / "victim.txt"
  victim.write_text("keep me")
  attempts = {
      "open": f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
      "os.open": f"import os\nos.open({str(tmp_path / 'new.txt')!r}, os.O_WRONLY | os.O_CREAT)",
      "append": f"open({str(victim)!r}, 'a').write('x')",
      "remove": f"import os\nos.remove({str(victim)!r})",
      "rename": f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
      "chdir": f"import os\nos.chdir({str(tmp_path)!r})\nopen('new.txt', 'w')",
      "symlink": f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w')",
  }
  for name, program in attempts.items():
    result = run_python(program)
    assert result.reason.startswith("blocked: "), (name, result)
  assert victim.read_text() == "keep me"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_work_dir_is_writable_and_removed_afterwards():
  program = ("import os, tempfile\nopen('scratch.txt', 'w').write('hi')\n"
             "os.mkdir('sub')\nos.rename('scratch.txt', 'sub/s.txt')\n"
             "with tempfile.NamedTemporaryFile() as f:\n  f.write(b'x')\n"
             "print(os.getcwd(), os.environ['HOME'] == os.getcwd(), open('sub/s.txt').read())\n")
  result = run_python(program)
  assert result.reason == "ok", result.stderr
  work_dir, home_is_work, content = result.stdout.split()
  assert home_is_work == "True" and content == "hi"
  assert not os.path.exists(work_dir)


def test_network_is_cut():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    for program in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
                    f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n"):
      result = run_python(program)
      assert result.reason.startswith("blocked: socket."), result
    with pytest.raises(socket.timeout):
      listener.accept()   # nobody connected
  assert result.isolation in ("netns", "audit-hook")
  if result.isolation == "netns":   # the kernel view: only a loopback device, in its own namespace
    devices = run_python("print([l.split(':')[0].strip() for l in open('/proc/net/dev')][2:])")
    assert devices.stdout.strip() == "['lo']"


def test_output_flood_is_capped():
  result = run_python("import sys\nwhile True:\n  sys.stdout.write('x' * 65536)\n", output_mb=1)
  assert result.reason == "output/file size limit"
  assert len(result.stdout) <= (1 << 20) + 1


def test_threads_unicode_and_stdin_work():
  program = ("import sys, threading\nthreading.stack_size(1 << 26)\nout = []\n"
             "t = threading.Thread(target=lambda: out.append(input()[::-1]))\nt.start()\nt.join()\n"
             "print(out[0], '数学')\n")
  result = run_python(program, stdin="éab\n")
  assert (result.reason, result.stdout) == ("ok", "baé 数学\n")


def test_syntax_error_and_exit_code():
  assert run_python("def f(:\n").reason.startswith("runtime error: SyntaxError")
  result = run_python("import sys\nsys.exit(3)\n")
  assert (result.returncode, result.reason) == (3, "exit code 3")


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
  assert run_tests(ADD_TWO, '{"inputs": ["2 2"], "outputs": ["4"]}') == (1.0, ["passed"])
