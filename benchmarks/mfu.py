"""cftjax efficiency against this machine's own limits, measured in the same invocation: train-step MFU
against the measured dense f32 matmul peak, and rollout against the decode roofline.

Usage: python benchmarks/mfu.py [--hiddens 512 1024] [--batch 8] [--rounds 2] [--skip-rollout] [--huge-pages]
(`--hiddens` with no value: the rollout roofline only). The model flags (--hidden, --intermediate,
--layers, --vocab, --tie-embeddings, --dtype ...) set the rollout's model and, at --hidden, the
train model's; benchmarks/gpu.sh passes a Qwen2.5-1.5B shape in bf16.
Each measurement runs in a subprocess right after a fresh peak measurement (peers/cftjax_peak.py), so
load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

from peers import harness

def rollout_roofline_s(shapes: harness.Shapes, peak_flops: float, bandwidth: float) -> float:
  """Lower bound on one rollout's seconds: the prefill at peak FLOP/s, then each decode step at the
  slower of its FLOPs at peak and its bytes (every weight in the compute dtype, an untied embedding
  table excepted, plus the K/V of the positions so far) at the measured read bandwidth."""
  kv_per_position = (2 * shapes.layers * shapes.batch * shapes.kv_heads * shapes.head_dim
                     * shapes.dtype_bytes)
  gathered_only = 0 if shapes.tie_embeddings else shapes.vocab * shapes.hidden  # the embedding table
  weight_bytes = (shapes.params - gathered_only) * shapes.dtype_bytes
  attention_width = shapes.layers * shapes.heads * shapes.head_dim
  prefill = shapes.batch * shapes.seq * (2 * shapes.matmul_params + 2 * shapes.seq * attention_width)
  total = prefill / peak_flops
  for step in range(1, shapes.new_tokens):  # the prefill emits the first new token
    context = shapes.seq + step
    flops = shapes.batch * (2 * shapes.matmul_params + 4 * context * attention_width)
    total += max(flops / peak_flops, (weight_bytes + context * kv_per_position) / bandwidth)
  return total


def measure(script: str, shapes: harness.Shapes, timeout_s: float) -> tuple[dict, dict]:
  """(peak result, worker result): a fresh peak measurement, then the worker."""
  peak = harness.measure_peak(shapes, timeout_s)
  result = harness.run_worker(harness.System("cftjax", sys.executable, script), shapes, timeout_s)
  if "error" in result:
    raise SystemExit(f"{script} failed: {result['error']}")
  print(f"  step seconds {['%.3f' % t for t in result['step_s']]}", flush=True)
  return peak, result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--hiddens", type=int, nargs="*", default=[512, 1024],
                      help="train MFU at these hidden sizes (none: rollout only)")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--skip-rollout", action="store_true")
  parser.add_argument("--prompt", type=int, default=64, help="rollout prompt tokens")
  parser.add_argument("--rollout-batch", type=int, default=8)
  parser.add_argument("--timeout", type=float, default=900.0)
  harness.add_shape_args(parser, ["vocab", "hidden", "intermediate", "layers", "heads", "kv_heads",
                                  "tie_embeddings", "dtype", "batch", "seq", "new_tokens", "warmup",
                                  "steps"])
  harness.add_host_memory_arg(parser)
  args = parser.parse_args()
  harness.apply_host_memory_arg(args)
  base = harness.shapes_from_args(args)
  info = harness.describe(base, "cftjax only; peak re-measured before every run")
  info["load average (1/5/15 min) at start"] = harness.load_average()

  rows = []
  for hidden in args.hiddens:
    intermediate = args.intermediate if hidden == base.hidden else 0  # 0: Qwen2's ratio
    shapes = dataclasses.replace(base, hidden=hidden, intermediate=intermediate)
    fractions, speeds, peaks = [], [], []
    for r in range(args.rounds):
      print(f"[train hidden {hidden}, round {r + 1}/{args.rounds}]", flush=True)
      peak, result = measure("peers/cftjax_train.py", shapes, args.timeout)
      step = statistics.median(result["step_s"])
      fractions.append(shapes.train_step_flops / step / peak["peak_flops"])
      speeds.append(shapes.batch * shapes.seq / step)
      peaks.append(peak["peak_flops"])
    rows.append(("train", shapes, statistics.median(peaks), statistics.median(speeds),
                 statistics.median(fractions),
                 f"{shapes.train_step_flops / (shapes.batch * shapes.seq) / 1e9:.2f} GFLOP/token"))

  if not args.skip_rollout:
    shapes = dataclasses.replace(base, seq=args.prompt, batch=args.rollout_batch)
    fractions, speeds, peaks = [], [], []
    for r in range(args.rounds):
      print(f"[rollout, round {r + 1}/{args.rounds}]", flush=True)
      peak, result = measure("peers/cftjax_rollout.py", shapes, args.timeout)
      call = statistics.median(result["step_s"])
      bound = rollout_roofline_s(shapes, peak["peak_flops"], peak["read_bandwidth"])
      fractions.append(bound / call)
      speeds.append(shapes.batch * shapes.new_tokens / call)
      peaks.append(peak["read_bandwidth"])
    rows.append(("rollout", shapes, statistics.median(peaks), statistics.median(speeds),
                 statistics.median(fractions), f"roofline {shapes.batch * shapes.new_tokens / bound:,.0f}"
                 " tokens/s at the last round's peaks"))

  info["load average at end"] = harness.load_average()
  print("\n## cftjax efficiency")
  for key, value in info.items():
    print(f"{key}: {value}")
  print("| workload | hidden | shapes | measured peak | tokens/s | fraction of peak / roofline | note |")
  print("|---|---|---|---|---|---|---|")
  for kind, shapes, peak, speed, fraction, note in rows:
    shape = (f"batch {shapes.batch} x {shapes.seq}" if kind == "train" else
             f"batch {shapes.batch}, prompt {shapes.seq}, {shapes.new_tokens} new")
    unit = harness.flops_text(peak) if kind == "train" else f"{peak / 1e9:.1f} GB/s"
    print(f"| {kind} | {shapes.hidden} | {shape} | {unit} | {speed:,.0f} | {fraction:.0%} | {note} |")


if __name__ == "__main__":
  main()
