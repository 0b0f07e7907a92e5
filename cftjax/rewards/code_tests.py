"""A program's tests, run in the code sandbox and judged by the trainer (docs/security.md).

Two kinds of tests:
- stdin/stdout pairs: each input runs the program in its own sandbox; the trainer compares its stdout
  with the expected output (line by line after stripping). Tests of one program run in parallel.
- assert statements: each statement's expression is split (`split_assert`) into the parts that touch
  the program's names ("value expressions", evaluated inside one sandbox after the program, their
  results sent back as plain data) and the rest (literals, comparisons, trusted builtins), which the
  trainer evaluates on those values, with type-strict `==` / `!=`. Expected values never enter the
  sandbox, and a test passes only when the trainer's own evaluation gives True: exit codes, prints,
  atexit or excepthook cannot pass a test, and an object whose `__eq__` is always True cannot come
  back (only exact builtin types do).

All tests of a program share one time budget; with stop_at_first_failure (all-or-nothing rewards)
no test starts after a failure is known.
"""

from __future__ import annotations

import ast
import builtins
import concurrent.futures
import dataclasses
import json
import math
import threading
import time
from typing import Any, Callable

from cftjax.rewards.sandbox import Limits, run_python

# What the trainer itself evaluates in an assert's expression: cheap functions of plain data (none
# whose cost grows with a number the program returns, like range or math.factorial).
_TRUSTED_BUILTINS = {name: getattr(builtins, name) for name in (
    "abs", "all", "any", "bool", "dict", "float", "frozenset", "int", "len", "list", "max", "min",
    "round", "set", "sorted", "str", "sum", "tuple")}
_TRUSTED_MATH = frozenset(("isclose", "isfinite", "isinf", "isnan", "floor", "ceil", "sqrt", "fabs",
                           "trunc", "inf", "nan", "pi", "e", "tau"))
_TRUSTED_MODULES = {"math": math}
_LEAF = "_value_"
_MATERIALIZE = "__cftjax_materialize__"   # defined by sandbox_child
_NOT_RUN = "not run: an earlier test failed"
_OUT_OF_TIME = "not run: time budget spent"


@dataclasses.dataclass(frozen=True)
class StdioTest:
  stdin: str
  expected: str


@dataclasses.dataclass(frozen=True)
class AssertTest:
  """setup: statements run inside before the expressions; expressions: sources evaluated inside;
  checks: (trainer-side expression over _value_<i> names, original assert source) per assert."""

  setup: str
  expressions: tuple[str, ...]
  checks: tuple[tuple[str, str], ...]


def _as_text(value: Any) -> str:
  """A test input/output as text: lists are lines."""
  if isinstance(value, (list, tuple)):
    return "\n".join(str(v) for v in value)
  return str(value)


def _output_lines(text: str) -> list[str]:
  return [line.strip() for line in text.strip().splitlines()]


def _is_trusted(node: ast.AST) -> bool:
  """A name or attribute the trainer evaluates itself (trusted builtins, math.<trusted>)."""
  if isinstance(node, ast.Name):
    return node.id in _TRUSTED_BUILTINS or node.id in _TRUSTED_MODULES
  return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in _TRUSTED_MODULES and node.attr in _TRUSTED_MATH)


def _touches_program(node: ast.AST) -> bool:
  return any(isinstance(n, ast.Name) and not _is_trusted(n) for n in ast.walk(node))


class _StrictEquality(ast.NodeTransformer):
  """Rewrites `a == b` / `a != b` (chains too) into _strict_equal calls."""

  def visit_Compare(self, node: ast.Compare) -> ast.AST:
    self.generic_visit(node)
    if not any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
      return node
    operands, parts = [node.left, *node.comparators], []
    for op, left, right in zip(node.ops, operands, operands[1:]):
      if isinstance(op, (ast.Eq, ast.NotEq)):
        call = ast.Call(ast.Name("_strict_equal", ast.Load()), [left, right], [])
        parts.append(call if isinstance(op, ast.Eq) else ast.UnaryOp(ast.Not(), call))
      else:
        parts.append(ast.Compare(left, [op], [right]))
    return parts[0] if len(parts) == 1 else ast.BoolOp(ast.And(), parts)


class _Splitter(ast.NodeTransformer):
  """Replaces each maximal part of an expression that touches the program's names with _value_<i>,
  keeping in the trainer the structure around it: comparisons, and/or/not, displays, subscripts,
  literals and calls of trusted functions without lambda or comprehension arguments. Arithmetic on
  the program's values runs inside (its cost would be the program's to choose). A part passed to a
  trusted call is materialized inside (iterators become lists), as that call would consume it."""

  _KEEP = (ast.Compare, ast.BoolOp, ast.UnaryOp, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.IfExp,
           ast.Subscript, ast.Slice, ast.Starred)
  _INSIDE_ONLY = (ast.Lambda, ast.GeneratorExp, ast.ListComp, ast.SetComp, ast.DictComp)

  def __init__(self, expressions: list[str]):
    self.expressions = expressions
    self._materialize = False

  def visit(self, node: ast.AST) -> ast.AST:
    if not isinstance(node, (ast.expr, ast.keyword)) or not _touches_program(node):
      return node
    if isinstance(node, ast.keyword):
      node.value = self.visit(node.value)
      return node
    if isinstance(node, ast.Call) and _is_trusted(node.func) and not any(
        isinstance(a, self._INSIDE_ONLY) for a in [*node.args, *(k.value for k in node.keywords)]):
      materialize, self._materialize = self._materialize, True
      node.args = [self.visit(a) for a in node.args]
      node.keywords = [self.visit(k) for k in node.keywords]
      self._materialize = materialize
      return node
    if isinstance(node, self._KEEP) and not (isinstance(node, ast.UnaryOp)
                                             and not isinstance(node.op, ast.Not)):
      materialize, self._materialize = self._materialize, False
      node = self.generic_visit(node)
      self._materialize = materialize
      return node
    source = ast.unparse(node)
    self.expressions.append(f"{_MATERIALIZE}({source})" if self._materialize else source)
    return ast.Name(f"{_LEAF}{len(self.expressions) - 1}", ast.Load())


def split_assert(test: str, index: int = 0) -> AssertTest:
  """Parses one test (statements, at least one assert) into what runs inside and what the trainer
  checks; ValueError naming the test when it does not parse or holds no assert."""
  try:
    tree = ast.parse(test)
  except SyntaxError as e:
    raise ValueError(f"run_tests: test {index} is not valid Python ({e.msg}, line {e.lineno}): "
                     f"{test[:120]!r}") from e
  setup, expressions, checks = [], [], []
  for statement in tree.body:
    if not isinstance(statement, ast.Assert):
      if checks:
        raise ValueError(f"run_tests: test {index} has a statement after an assert; put setup "
                         f"statements first: {test[:120]!r}")
      setup.append(ast.unparse(statement))
      continue
    source = ast.unparse(statement)
    check = _Splitter(expressions).visit(statement.test)
    check = ast.fix_missing_locations(_StrictEquality().visit(ast.Expression(check)))
    checks.append((ast.unparse(check.body), source))
  if not checks:
    raise ValueError(f"run_tests: test {index} holds no assert statement: {test[:120]!r}")
  return AssertTest("\n".join(setup), tuple(expressions), tuple(checks))


def parse_tests(tests: Any) -> list[StdioTest] | list[AssertTest]:
  """tests: {"inputs": [...], "outputs": [...]} stdin/stdout pairs, a list of assert tests (each a
  string of statements), or a JSON string of either."""
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
    return [StdioTest(_as_text(i), _as_text(o)) for i, o in zip(inputs, outputs)]
  if isinstance(tests, (list, tuple)) and all(isinstance(t, str) for t in tests):
    return [split_assert(t, i) for i, t in enumerate(tests)]
  raise ValueError(f"run_tests: tests must be a dict with 'inputs'/'outputs' or a list of assert "
                   f"strings, got {type(tests).__name__}")


# ------------------------------------------------------------------------------------------------
# Judging values sent back by the sandbox.


class _Malformed(ValueError):
  pass


def decode(encoded: Any) -> Any:
  """Plain data from sandbox_child.encode's tagged form; _Malformed for anything else."""
  if not isinstance(encoded, list) or not encoded or not isinstance(encoded[0], str):
    raise _Malformed("malformed value")
  tag, payload = encoded[0], encoded[1:]
  simple: dict[str, Callable[[Any], Any]] = {
      "bool": lambda p: p if isinstance(p, bool) else _fail(),
      "int": lambda p: int(p) if isinstance(p, str) and len(p) < 5000 else _fail(),
      "float": lambda p: float(p) if isinstance(p, str) else _fail(),
      "str": lambda p: p if isinstance(p, str) else _fail(),
      "bytes": lambda p: bytes.fromhex(p) if isinstance(p, str) else _fail(),
      "complex": lambda p: complex(float(p[0]), float(p[1])),
  }
  if tag == "none" and not payload:
    return None
  if tag == "unsupported":
    raise _Malformed(f"a value of type {payload[0] if payload else '?'} (only plain builtin data "
                     "is compared)")
  if len(payload) != 1:
    raise _Malformed("malformed value")
  (body,) = payload
  try:
    if tag in simple:
      return simple[tag](body)
    if tag in ("list", "tuple", "set", "frozenset") and isinstance(body, list):
      return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](
          decode(v) for v in body)
    if tag == "dict" and isinstance(body, list):
      return {decode(k): decode(v) for k, v in body}
  except (TypeError, ValueError, IndexError) as e:   # unhashable set members, bad numbers, ...
    raise _Malformed(f"malformed value ({type(e).__name__})") from None
  raise _Malformed("malformed value")


def _fail() -> Any:
  raise _Malformed("malformed value")


def strict_equal(a: Any, b: Any) -> bool:
  """== that also requires equal types, recursively (1 != 1.0, True != 1, [1] != (1,))."""
  if type(a) is not type(b):
    return False
  if isinstance(a, (list, tuple)):
    return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b))
  if isinstance(a, dict):
    return (_typed(a) == _typed(b)) and all(strict_equal(a[k], b[k]) for k in a)
  if isinstance(a, (set, frozenset)):
    return _typed(a) == _typed(b)
  return a == b


def _typed(members: Any) -> set[tuple[type, Any]]:
  return {(type(m), m) for m in members}


def _judge(test: AssertTest, record: dict[str, Any] | None, failure: str) -> str:
  """"passed" or why not, for one assert test and the sandbox's record of it (None: no record)."""
  if record is None:
    return failure
  if "error" in record:
    return f"runtime error: {str(record['error'])[:200]}"
  encoded = record.get("values")
  if not isinstance(encoded, list) or len(encoded) != len(test.expressions):
    return "malformed result"
  try:
    values = {f"{_LEAF}{i}": decode(v) for i, v in enumerate(encoded)}
  except RecursionError:
    return "wrong answer: malformed value (nested too deeply)"
  except _Malformed as e:
    return f"wrong answer: {e}"
  namespace = {"__builtins__": _TRUSTED_BUILTINS, **_TRUSTED_MODULES, "_strict_equal": strict_equal,
               **values}
  for check, source in test.checks:
    try:
      outcome = eval(check, namespace)   # pylint: disable=eval-used  (dataset text, plain data)
    except Exception as e:  # pylint: disable=broad-except
      return f"wrong answer: {source[:120]} raised {type(e).__name__}"
    if outcome is not True:
      return f"wrong answer: {source[:120]}"
  return "passed"


def _records(stdout: str) -> dict[int, dict[str, Any]]:
  """{test index: record} from the sandbox's JSON lines (the first record of an index counts)."""
  records: dict[int, dict[str, Any]] = {}
  for line in stdout.splitlines():
    try:
      record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
      continue
    if isinstance(record, dict) and isinstance(record.get("test"), int):
      records.setdefault(record["test"], record)
  return records


# ------------------------------------------------------------------------------------------------
# Running.


def _run_assert_tests(code: str, tests: list[AssertTest], limits: Limits, isolation: str,
                      deadline: float, stop_at_first_failure: bool) -> list[str]:
  """One sandbox runs the program and every test's expressions; when it dies before the end (and
  failures do not stop the run), the tests after the one it died on run again in a fresh one."""
  reasons: list[str | None] = [None] * len(tests)
  start = 0
  while start < len(tests) and (remaining := deadline - time.monotonic()) > 0:
    job = json.dumps({"tests": [{"setup": t.setup, "expressions": list(t.expressions)}
                                for t in tests[start:]],
                      "stop_at_first_failure": stop_at_first_failure})
    result = run_python(code, limits=dataclasses.replace(limits, wall_s=min(limits.wall_s, remaining)),
                        isolation=isolation, job=job)
    records = _records(result.stdout)
    failure = "no result: " + (result.reason if result.reason != "ok" else "the program exited "
                               "before the test ran")
    for i in range(start, len(tests)):
      record = records.get(i - start)
      reasons[i] = _judge(tests[i], record, failure)
      if stop_at_first_failure and reasons[i] != "passed":
        return [r or _NOT_RUN for r in reasons]
      if record is None:   # the run died on this test: the ones after it get a fresh run
        start = i + 1
        break
    else:
      break
  return [r or _OUT_OF_TIME for r in reasons]


def _run_stdio_tests(code: str, tests: list[StdioTest], limits: Limits, isolation: str,
                     deadline: float, stop_at_first_failure: bool, parallel: int) -> list[str]:
  failed = threading.Event()

  def run_one(test: StdioTest) -> str:
    if stop_at_first_failure and failed.is_set():
      return _NOT_RUN
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return _OUT_OF_TIME
    result = run_python(code, stdin=test.stdin, isolation=isolation,
                        limits=dataclasses.replace(limits, wall_s=min(limits.wall_s, remaining)))
    if result.reason != "ok":
      reason = result.reason
    elif _output_lines(result.stdout) != _output_lines(test.expected):
      reason = "wrong answer"
    else:
      return "passed"
    failed.set()
    return reason

  with concurrent.futures.ThreadPoolExecutor(min(parallel, len(tests)), "cftjax-tests") as pool:
    return list(pool.map(run_one, tests))


def run_tests(code: str, tests: Any, limits: Limits = Limits(), isolation: str = "bwrap",
              budget_s: float = 30.0, stop_at_first_failure: bool = False,
              parallel: int = 2) -> tuple[float, list[str]]:
  """(pass rate in [0, 1], per-test reason) of a program on its tests (module docstring).

  Args:
    code: the program.
    tests: see parse_tests.
    limits: per sandbox run (wall_s: per test, cut to what is left of the budget).
    isolation: "bwrap" or "none" (cftjax.rewards.sandbox).
    budget_s: total wall-clock time for all tests of this program; tests not started in it fail.
    stop_at_first_failure: start no test after a failure is known (all-or-nothing rewards).
    parallel: stdin/stdout tests run at once (assert tests share one sandbox run).
  """
  cases = parse_tests(tests)
  if not cases:
    raise ValueError("run_tests: no tests given")
  deadline = time.monotonic() + budget_s
  if isinstance(cases[0], AssertTest):
    reasons = _run_assert_tests(code, cases, limits, isolation, deadline, stop_at_first_failure)
  else:
    reasons = _run_stdio_tests(code, cases, limits, isolation, deadline, stop_at_first_failure,
                               parallel)
  return sum(r == "passed" for r in reasons) / len(reasons), reasons
