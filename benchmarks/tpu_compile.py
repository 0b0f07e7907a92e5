"""cftjax, MaxText and tunix training steps compiled ahead of time for the same TPU topologies and
shapes, side by side, with the TPU compiler's figures per chip (docs/benchmarks.md, "Under the TPU
compiler"). No TPU is needed: each system compiles for the topology's devices with libtpu, in its
own virtual environment (benchmarks/setup.sh maxtext-tpu tunix-tpu), one process at a time.

  python benchmarks/tpu_compile.py [--systems cftjax maxtext tunix] [--models qwen2_5_7b ...]
      [--topologies v5p:2x2x2 ...] [--batch 8] [--seq 4096] [--no-cost] [--out DIR]
      [-- extra cftjax overrides]

Per system, per chip and step: memory (the real program), HBM traffic and the cost model's step
time from loop-free compiles (cftjax: `cftjax compile`'s 1- and 2-layer correction; MaxText:
scan_layers=False; tunix: its layers are a Python loop already; a peer whose whole written-out model
does not fit the chip, as on v5e, gets the 1- and 2-layer correction too), Pallas kernels' attention FLOPs
added at MXU peak, collectives of the real program weighted by loop trip counts (`cftjax.hlo` for
every system), and MFU = model FLOPs (6 N tokens + attention, the same count for every system) /
(estimated seconds x chips x peak). Also from the real program alone, for every system: the per-op
estimate (`cftjax.hlo.program_seconds`: the compiler's own cycle estimates of each op in its
schedule at the chip's clock, trip-weighted, plus the same Pallas part) and its MFU, which needs no
cost compiles (`--no-cost` skips them) and stays a time on chips where the cost model's is not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)
from cftjax import aot, hlo  # noqa: E402  pylint: disable=wrong-import-position
from cftjax.models import ModelConfig  # noqa: E402  pylint: disable=wrong-import-position
from cftjax.train import run as run_lib  # noqa: E402  pylint: disable=wrong-import-position

VENVS = os.environ.get("CFTJAX_BENCH_VENVS", os.path.join(BENCH_DIR, ".venv"))
MODEL_CONFIGS = os.path.join(BENCH_DIR, "model_configs")
RESULT_PREFIX = "BENCH_RESULT "
SYSTEMS = ("cftjax", "maxtext", "tunix")
MAXTEXT_MODEL_NAMES = {"qwen2_5_7b": "qwen2.5-7b", "llama3_1_8b": "llama3.1-8b", "qwen3_8b": "qwen3-8b"}


def maxtext_topology(topology: str) -> str:
  """JAX's topology name -> MaxText's compile_topology (v4 and v5p count 2 cores per chip)."""
  generation, grid = topology.split(":")
  chips = 1
  for size in grid.split("x"):
    chips *= int(size)
  return f"{generation}-{chips * (2 if generation in ('v4', 'v5p') else 1)}"


def _run(command: list[str], log_path: str, env: dict[str, str] | None = None) -> tuple[int, str]:
  start = time.time()
  # Importing jax here set TPU_LIBRARY_PATH to this venv's libtpu; each system must load its own
  # (an older libtpu fails on a newer jax's Pallas kernels: "unknown attribute code").
  inherited = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
  with open(log_path, "w") as log:
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO_ROOT,
                          env={**inherited, "PYTHONPATH": REPO_ROOT, **(env or {})})
  print(f"  [{time.time() - start:6.0f} s] exit {proc.returncode}: {' '.join(command[-6:])}", flush=True)
  with open(log_path, "a") as log:
    log.write("\n--- stdout ---\n" + proc.stdout)
  return proc.returncode, proc.stdout


def _bench_result(stdout: str) -> dict | None:
  lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
  return json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None


def run_cftjax(model: str, topology: str, batch: int, seq: int, extra: list[str], out: str, cost: bool
               ) -> dict | None:
  code, stdout = _run([sys.executable, "-m", "cftjax.cli", "compile", "--config",
                       os.path.join(BENCH_DIR, "tpu_compile_config.py"), "--topology", topology,
                       "--model-config", os.path.join(MODEL_CONFIGS, f"{model}.json"), "--json",
                       f"--config.data.batch_size={batch}", f"--config.data.max_seq_len={seq}",
                       "--hlo-out", os.path.join(out, f"cftjax_{model}_{topology}_real.hlo"),
                       *([] if cost else ["--no-cost"]), *extra],
                      os.path.join(out, f"cftjax_{model}_{topology}.log"))
  if code not in (0, 3):
    return None
  report = json.loads(stdout)
  return {"memory_gib": report["memory_gib_per_chip"], "hbm_gb": report["hbm_traffic_gb_per_chip"],
          "seconds": report["estimated_step_seconds"], "pallas_seconds": report["pallas_seconds"],
          "per_op_seconds": report["per_op_step_seconds"],
          "collective_gib": report["collective_gib_per_step"],
          "collectives": {k: (v["count"], v["gib"]) for k, v in report["collectives"].items()},
          "fits": report["fits"]}


def run_peer(system: str, model: str, topology: str, batch: int, seq: int, out: str,
             model_cfg: ModelConfig, cost: bool) -> dict | None:
  """The peer's real compile (memory, collectives, the per-op estimate) and, if `cost`, its
  loop-free cost compile."""
  python = os.path.join(VENVS, f"{system}-tpu", "bin", "python")
  if not os.path.exists(python):
    print(f"  {python} missing: run `bash benchmarks/setup.sh {system}-tpu`", flush=True)
    return None
  script = os.path.join(BENCH_DIR, "peers", f"{system}_aot.py")
  args = ["--topology", topology, "--model", model, "--batch", str(batch), "--seq", str(seq)]
  log = lambda mode: os.path.join(out, f"{system}_{model}_{topology}_{mode}.log")
  hlo_path = os.path.join(out, f"{system}_{model}_{topology}_real.hlo")
  code, stdout = _run([python, script, *args, "--hlo-out", hlo_path], log("real"))
  real = _bench_result(stdout) if code == 0 else None
  if real is None:
    return None
  chip = aot.chip(topology)
  pallas_seconds = 0.0
  if real["pallas_calls"]:
    pallas_seconds = aot.attention_flops(model_cfg, batch, seq, training=True) / (real["devices"] * chip.peak_flops)
  with open(hlo_path) as f:
    per_op_seconds = (hlo.program_seconds(f.read(), chip.clock_hz, chip.hbm_bandwidth) + pallas_seconds
                      if chip.clock_hz else None)
  cost_figures = {"bytes": None, "seconds": None}
  if cost:
    code, stdout = _run([python, script, *args, "--cost"], log("cost"))
    cost_run = _bench_result(stdout) if code == 0 else None
    if cost_run is None and _out_of_hbm(log("cost")):
      cost_run = _layer_extrapolated_cost(python, script, args, model_cfg.num_layers, log)
    if cost_run is None:
      return None
    cost_figures = cost_run["cost"]
  gib = 1024**3
  seconds = cost_figures["seconds"]
  return {"memory_gib": real["memory"]["total"] / gib,
          "hbm_gb": None if cost_figures["bytes"] is None else cost_figures["bytes"] / 1e9,
          # A negative cost-model time is no estimate (aot.NEGATIVE_COST), as for cftjax.
          "seconds": seconds + pallas_seconds if seconds is not None and seconds >= 0 else None,
          "pallas_seconds": pallas_seconds, "per_op_seconds": per_op_seconds,
          "collective_gib": sum(c["bytes"] for c in real["collectives"].values()) / gib,
          "collectives": {k: (c["count"], c["bytes"] / gib) for k, c in real["collectives"].items()},
          "fits": real["memory"]["total"] <= chip.hbm_bytes, "versions": real.get("versions")}


def _out_of_hbm(log_path: str) -> bool:
  with open(log_path) as log:
    return "RESOURCE_EXHAUSTED" in log.read()


def _layer_extrapolated_cost(python: str, script: str, args: list[str], layers: int, log) -> dict | None:
  """A peer's loop-free cost as cftjax takes its own, C(1) + (layers - 1) x (C(2) - C(1)) from 1- and
  2-layer compiles: for a topology whose chips cannot hold the whole model written out (v5e)."""
  costs = []
  for n in (1, 2):
    code, stdout = _run([python, script, *args, "--cost", "--layers", str(n)], log(f"cost_{n}layer"))
    result = _bench_result(stdout) if code == 0 else None
    if result is None:
      return None
    costs.append(result)
  one, two = costs[0], costs[1]
  extrapolated = {k: one["cost"][k] + (layers - 1) * (two["cost"][k] - one["cost"][k]) for k in one["cost"]}
  return {**two, "cost": extrapolated}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
  parser.add_argument("--models", nargs="+", default=["qwen2_5_7b"], choices=sorted(MAXTEXT_MODEL_NAMES))
  parser.add_argument("--topologies", nargs="+", default=["v5p:2x2x2"])
  parser.add_argument("--batch", type=int, default=8, help="global rows per step")
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--no-cost", action="store_true", help="the real programs only: no loop-free cost compiles")
  parser.add_argument("--out", default=None, help="results dir (default benchmarks/results/tpu_compile_<time>)")
  parser.add_argument("cftjax_overrides", nargs="*", help="extra --config.* for cftjax (after --)")
  args = parser.parse_args()
  out = args.out or os.path.join(BENCH_DIR, "results",
                                 "tpu_compile_" + datetime.datetime.now().strftime("%Y%m%d_%H%M%S"))
  os.makedirs(out, exist_ok=True)
  rows = []
  for model in args.models:
    with open(os.path.join(MODEL_CONFIGS, f"{model}.json")) as f:
      model_cfg = ModelConfig.from_hf_dict(json.load(f)).replace(remat="full")
    model_flops = run_lib.train_flops_per_token(model_cfg, args.seq) * args.batch * args.seq
    for topology in args.topologies:
      chip = aot.chip(topology)
      print(f"{model} on {topology}, {args.batch} x {args.seq} tokens", flush=True)
      for system in args.systems:
        if system == "cftjax":
          result = run_cftjax(model, topology, args.batch, args.seq, args.cftjax_overrides, out, not args.no_cost)
        else:
          result = run_peer(system, model, topology, args.batch, args.seq, out, model_cfg, not args.no_cost)
        if result is None:
          print(f"  {system}: failed (see the logs in {out})", flush=True)
          continue
        result |= {"system": system, "model": model, "topology": topology, "batch": args.batch, "seq": args.seq}
        chips = _chips(topology)  # counted here: the driver never loads libtpu itself
        mfu = lambda seconds: model_flops / (seconds * chips * chip.peak_flops) if seconds else None
        result["mfu"], result["per_op_mfu"] = mfu(result["seconds"]), mfu(result["per_op_seconds"])
        result["hbm_gib_per_chip"] = chip.hbm_bytes / 1024**3
        rows.append(result)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(format_table(rows))


def _chips(topology: str) -> int:
  chips = 1
  for size in topology.split(":")[1].split("x"):
    chips *= int(size)
  return chips


def format_table(rows: list[dict]) -> str:
  lines = ["| model, topology | system | memory GiB/chip (of HBM) | HBM traffic GB/chip | estimated step s "
           "(Pallas part) | estimated MFU | per-op estimate s, MFU | collectives GiB/chip/step "
           "(AG/AR/RS/A2A/CP counts) |",
           "|---|---|---|---|---|---|---|---|"]
  number = lambda value, spec: "-" if value is None else format(value, spec)
  for r in rows:
    counts = "/".join(str(r["collectives"].get(k, (0, 0))[0]) for k in
                      ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute"))
    step = "no estimate" if r["seconds"] is None else f"{r['seconds']:.3f}"
    lines.append(f"| {r['model']} {r['batch']}x{r['seq']}, {r['topology']} | {r['system']} | "
                 f"{r['memory_gib']:.1f} (of {r['hbm_gib_per_chip']:.0f}){'' if r['fits'] else ' DOES NOT FIT'} | "
                 f"{number(r['hbm_gb'], '.0f')} | {step} ({r['pallas_seconds']:.3f}) | {number(r['mfu'], '.2f')} | "
                 f"{number(r['per_op_seconds'], '.3f')}, {number(r['per_op_mfu'], '.2f')} | "
                 f"{r['collective_gib']:.1f} ({counts}) |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
