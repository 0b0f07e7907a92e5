"""Shared by the TPU ahead-of-time peer workers (maxtext_aot.py, tunix_aot.py), which run in their
own virtual environments: the compiler's figures of a compiled program as one `BENCH_RESULT {json}`
line, with the collectives counted by `cftjax.hlo` (standard library only), the same census
`cftjax compile` uses.

Import this module before jax: `--cost` turns windowed einsum off (LIBTPU_INIT_ARGS), so the
all-gather / reduce-scatter matmuls are no loops the cost model would count once.
"""

from __future__ import annotations

import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)
from cftjax import hlo  # noqa: E402  pylint: disable=wrong-import-position

RESULT_PREFIX = "BENCH_RESULT "
COST_MODE = "--cost" in sys.argv
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "x")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if COST_MODE:
  os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "")
                                    + " --xla_tpu_enable_windowed_einsum_for_all_gather=false"
                                    + " --xla_tpu_enable_windowed_einsum_for_reduce_scatter=false").strip()


def summary(compiled, compile_seconds: float, hlo_out: str | None = None, **extra) -> dict:
  """Memory per chip by kind, cost-model figures and trip-weighted collectives of `compiled`; its
  optimised HLO text is written to `hlo_out` if given (for the driver's per-op estimate)."""
  m = compiled.memory_analysis()
  memory = {kind: float(getattr(m, f"{kind}_size_in_bytes", 0) or 0)
            for kind in ("argument", "output", "alias", "temp", "generated_code")}
  memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                     + memory["generated_code"])
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else dict(cost or {})
  text = compiled.as_text()
  if hlo_out:
    with open(hlo_out, "w") as f:
      f.write(text)
  totals = hlo.totals_by_kind(hlo.collectives(text))
  return {
      "memory": memory, "cost_mode": COST_MODE,
      "cost": {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0)),
               "seconds": float(cost.get("optimal_seconds", 0.0))},
      "collectives": {k: {"count": t.count, "bytes": t.bytes} for k, t in totals.items()},
      "pallas_calls": hlo.count_custom_calls(text, "tpu_custom_call"),
      "compile_seconds": compile_seconds, **extra,
  }


def emit(result: dict) -> None:
  print(RESULT_PREFIX + json.dumps(result), flush=True)
