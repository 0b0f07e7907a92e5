"""Code-reward throughput: honest completions of a 10-test stdin/stdout problem scored in one batch.

Scores the same batch with the code reward under isolation "bwrap" (namespaces + seccomp) and
"none" (rlimits only), and, with --baseline-ref, with the audit-hook sandbox of that git commit
(its cftjax/rewards/sandbox.py run_tests, driven as its code reward drove it: num_workers
completions at once, tests one after another). Prints completions/s and tests/s of wall time and
checks every completion scored 1.0.
Usage: python benchmarks/code_sandbox.py [--completions 1000] [--baseline-ref f91bd2d]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

from cftjax.data.critique import CritiqueRecord
from cftjax.rewards.registry import score_batch
from cftjax.rewards.sandbox import check_isolation

# Sum of the integers on stdin, read line by line: a typical competitive-programming shape.
SOLUTION = "import sys\nprint(sum(int(x) for line in sys.stdin for x in line.split()))\n"
TESTS = {"inputs": [f"{i} {i + 1}\n{2 * i}" for i in range(10)],
         "outputs": [str(4 * i + 1) for i in range(10)]}


def _baseline_run_tests(ref: str):
  """run_tests of cftjax/rewards/sandbox.py at git commit ref."""
  source = subprocess.run(["git", "show", f"{ref}:cftjax/rewards/sandbox.py"], capture_output=True,
                          text=True, check=True).stdout
  path = os.path.join(tempfile.mkdtemp(), "baseline_sandbox.py")
  with open(path, "w") as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location("baseline_sandbox", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # its dataclasses look their module up
  spec.loader.exec_module(module)
  return module.run_tests


def _measure(score_all, completions: int) -> tuple[float, list[float]]:
  start = time.perf_counter()
  scores = score_all()
  elapsed = time.perf_counter() - start
  assert len(scores) == completions
  return elapsed, scores


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--completions", type=int, default=1000)
  parser.add_argument("--num-workers", type=int, default=4, help="completions scored at once")
  parser.add_argument("--parallel-tests", type=int, default=2, help="tests of one completion at once")
  parser.add_argument("--baseline-ref", default="", help="git commit of the audit-hook sandbox")
  args = parser.parse_args()
  completion = f"```python\n{SOLUTION}```"
  records = [CritiqueRecord(question="sum", tests=TESTS, source="code", id=str(i))
             for i in range(args.completions)]
  print(f"isolation: {check_isolation('bwrap')}")
  print(f"{os.cpu_count()} CPUs; {args.completions} completions x {len(TESTS['inputs'])} tests; "
        f"num_workers {args.num_workers}, parallel_tests {args.parallel_tests}")
  runs = {}
  for isolation in ("bwrap", "none"):
    runs[f"isolation={isolation}"] = lambda isolation=isolation: [r.score for r in score_batch(
        "code", [completion] * args.completions, records, isolation=isolation,
        num_workers=args.num_workers, parallel_tests=args.parallel_tests)]
  if args.baseline_ref:
    run_tests = _baseline_run_tests(args.baseline_ref)

    def baseline() -> list[float]:
      with concurrent.futures.ThreadPoolExecutor(args.num_workers) as pool:
        return list(pool.map(lambda _: run_tests(SOLUTION, TESTS, num_workers=1)[0],
                             range(args.completions)))
    runs[f"audit hook ({args.baseline_ref})"] = baseline
  print("| sandbox | wall s | completions/s | tests/s | all scored 1.0 |")
  print("|---|---|---|---|---|")
  for name, run in runs.items():
    elapsed, scores = _measure(run, args.completions)
    tests = args.completions * len(TESTS["inputs"])
    print(f"| {name} | {elapsed:.1f} | {args.completions / elapsed:.2f} | {tests / elapsed:.1f} | "
          f"{all(s == 1.0 for s in scores)} |", flush=True)


if __name__ == "__main__":
  sys.exit(main())
