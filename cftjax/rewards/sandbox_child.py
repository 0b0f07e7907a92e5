"""The program the code sandbox starts (`python -I -S -B sandbox_child.py CONFIG_JSON`): standard
library only, never imported by the trainer (cftjax.rewards.sandbox sends this file's text in).

It sets the resource limits from CONFIG_JSON (as pid 1 of the sandbox it forks, then only reaps
and watches the trainer's lifeline), then, by config["mode"]:
- "program": runs the candidate's solution.py as __main__ (stdin/stdout tests);
- "values": runs solution.py, then for each test its setup statements and the expressions listed in
  job.json, and writes one JSON line per test to the original stdout: {"test": i, "values": [...]}
  or {"test": i, "error": "..."}; the candidate's own prints go to stderr. Values are encoded as
  tagged plain data (`encode`); the trainer decodes them and decides pass/fail itself, so nothing
  written here can turn a failure into a pass without the candidate producing the right values.
"""

import json
import os
import resource
import select
import signal
import sys
import types

_MAX_DEPTH = 64
_PR_SET_DUMPABLE = 4


def set_limits(config):
  """Lowers this process's rlimits (inherited by everything it starts); RLIMIT_NPROC counts the
  processes of this user namespace only, because it is set inside it."""
  limits = [(resource.RLIMIT_CPU, config["cpu_s"], config["cpu_s"] + 1),
            (resource.RLIMIT_AS, config["memory_bytes"], config["memory_bytes"]),
            (resource.RLIMIT_FSIZE, config["file_bytes"], config["file_bytes"]),
            (resource.RLIMIT_NOFILE, config["open_files"], config["open_files"]),
            (resource.RLIMIT_NPROC, config["max_processes"], config["max_processes"]),
            (resource.RLIMIT_CORE, 0, 0)]
  for limit, soft, hard in limits:
    _, current_hard = resource.getrlimit(limit)
    if current_hard != resource.RLIM_INFINITY:
      soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(limit, (soft, hard))


def encode(value, depth=0):
  """A JSON-able tagged form of plain data (exact builtin types only); anything else is tagged
  "unsupported" with its type name, which the trainer scores as a failed test."""
  if depth > _MAX_DEPTH:
    return ["unsupported", "nesting deeper than %d" % _MAX_DEPTH]
  kind = type(value)
  if value is None:
    return ["none"]
  if kind is bool:
    return ["bool", value]
  if kind is int:
    return ["int", str(value)]
  if kind is float:
    return ["float", repr(value)]
  if kind is complex:
    return ["complex", [repr(value.real), repr(value.imag)]]
  if kind is str:
    return ["str", value]
  if kind is bytes:
    return ["bytes", value.hex()]
  if kind in (list, tuple, set, frozenset):
    return [kind.__name__, [encode(v, depth + 1) for v in value]]
  if kind is dict:
    return ["dict", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
  return ["unsupported", getattr(kind, "__qualname__", "?")]


def materialize(value):
  """Iterators, generators, views and ranges as lists (a trusted call in the test consumes them)."""
  if type(value) in (list, tuple, set, frozenset, dict, str, bytes):
    return value
  if hasattr(value, "__next__") or type(value) in (range, type({}.keys()), type({}.values()),
                                                     type({}.items())):
    return list(value)
  return value


def run_values(namespace, job, out):
  """Evaluates each test's setup and value expressions in the solution's namespace."""
  namespace["__cftjax_materialize__"] = materialize
  for index, test in enumerate(job["tests"]):
    try:
      exec(compile(test["setup"], "<test %d>" % index, "exec"), namespace)
      values = [encode(eval(compile(e, "<test %d>" % index, "eval"), namespace))
                for e in test["expressions"]]
      record = {"test": index, "values": values}
    except BaseException as e:  # pylint: disable=broad-except
      record = {"test": index, "error": "%s: %s" % (type(e).__name__, str(e)[:200])}
    out.write(json.dumps(record) + "\n")
    out.flush()
    if "error" in record and job["stop_at_first_failure"]:
      return


def reap_until(child, lifeline):
  """As pid 1 of the sandbox's pid namespace: reaps every process until `child` ends, then
  returns its exit code (128 + N for death by signal N, as a shell reports it). The trainer holds
  the write end of the `lifeline` pipe: end of file means it died, and so does the whole run."""
  wake_read, wake_write = os.pipe()
  os.set_blocking(wake_write, False)
  signal.set_wakeup_fd(wake_write)
  signal.signal(signal.SIGCHLD, lambda *_: None)
  while True:
    while True:
      try:
        pid, status = os.waitpid(-1, os.WNOHANG)
      except ChildProcessError:
        return 1
      if pid == 0:
        break
      if pid == child:
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code
    ready, _, _ = select.select([lifeline, wake_read], [], [])
    if lifeline in ready and not os.read(lifeline, 1):
      return 128 + signal.SIGKILL
    if wake_read in ready:
      os.read(wake_read, 512)


def main():
  config = json.loads(sys.argv[1])
  set_limits(config)
  if config["lifeline_fd"] is not None:   # pid 1: the candidate must not be, it ignores signals
    import ctypes  # pylint: disable=import-outside-toplevel
    prctl = ctypes.CDLL(None).prctl
    prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)   # pid 1's /proc entries (mem, fd) become unreachable
    child = os.fork()
    if child:
      os._exit(reap_until(child, config["lifeline_fd"]))
    prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    os.close(config["lifeline_fd"])
  os.chdir(config["work_dir"])
  out = None
  if config["mode"] == "values":
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)   # the candidate's prints go to stderr
    with open(config["job_path"], encoding="utf-8") as f:
      job = json.load(f)
  main_module = types.ModuleType("__main__")
  main_module.__file__ = "solution.py"
  sys.modules["__main__"] = main_module
  sys.argv = ["solution.py"]
  with open(config["solution_path"], encoding="utf-8") as f:
    program = compile(f.read(), "solution.py", "exec")
  del config
  exec(program, main_module.__dict__)
  if out is not None:
    run_values(main_module.__dict__, job, out)


main()
