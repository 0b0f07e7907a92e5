"""MaxText's own ahead-of-time compile of its train step (`maxtext.trainers.pre_train.train_compile`,
its `train_compile.py`) for a TPU topology, run in the maxtext-tpu environment of
benchmarks/setup.sh: `model_name` from MaxText's model configs, bf16 compute over float32 weights,
remat full, FSDP over every chip (MaxText's default ici_fsdp_parallelism=-1), its default splash
attention, synthetic data. The compiled step is taken from train_compile's `jit_and_compile`.
`--cost` compiles with scan_layers=False and windowed einsum off (a loop-free program); `--layers N`
overrides the model's decoder layer count (for the 1- and 2-layer cost compiles).

  TPU_ACCELERATOR_TYPE=x $VENVS/maxtext-tpu/bin/python maxtext_aot.py --topology v5p:2x2x2 \\
      --model qwen2_5_7b --batch 8 --seq 4096 [--cost] [--layers N] [--hlo-out FILE]
Prints one `BENCH_RESULT {json}` line (tpu_aot_common.summary).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import tpu_aot_common as common  # first: sets the libtpu environment before jax loads

import jax  # noqa: E402
import maxtext  # noqa: E402
from maxtext.trainers.pre_train import train_compile  # noqa: E402

MODEL_NAMES = {"qwen2_5_7b": "qwen2.5-7b", "llama3_1_8b": "llama3.1-8b", "qwen3_8b": "qwen3-8b"}


def maxtext_topology(topology: str) -> tuple[str, int]:
  """(MaxText's compile_topology, chips) of a JAX topology name: v4 and v5p count 2 cores a chip."""
  generation, grid = topology.split(":")
  chips = 1
  for size in grid.split("x"):
    chips *= int(size)
  return f"{generation}-{chips * (2 if generation in ('v4', 'v5p') else 1)}", chips


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--topology", default="v5p:2x2x2")
  parser.add_argument("--model", default="qwen2_5_7b", choices=sorted(MODEL_NAMES))
  parser.add_argument("--batch", type=int, default=8, help="global rows (a multiple of the chips)")
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--cost", action="store_true")
  parser.add_argument("--layers", type=int, default=0, help="decoder layers (0: the model's)")
  parser.add_argument("--hlo-out", default=None, help="write the optimised HLO here")
  args = parser.parse_args()
  name, chips = maxtext_topology(args.topology)
  if args.batch % chips:
    raise SystemExit(f"--batch {args.batch} must be a multiple of the {chips} chips (per_device_batch_size)")
  captured = {}
  original = train_compile.jit_and_compile

  def capture(*a, **k):
    start = time.perf_counter()
    captured["compiled"] = original(*a, **k)
    captured["seconds"] = time.perf_counter() - start
    return captured["compiled"]

  train_compile.jit_and_compile = capture
  out_dir = tempfile.mkdtemp(prefix="maxtext_aot_")
  overrides = [f"model_name={MODEL_NAMES[args.model]}", f"compile_topology={name}",
               "compile_topology_num_slices=1", f"per_device_batch_size={args.batch // chips}",
               f"max_target_length={args.seq}", "remat_policy=full", "dtype=bfloat16", "weight_dtype=float32",
               f"base_output_directory={out_dir}", "run_name=aot", "dataset_type=synthetic",
               "enable_checkpointing=false"] + (["scan_layers=False"] if args.cost else [])
  if args.layers:
    overrides += ["override_model_config=true", f"base_num_decoder_layers={args.layers}"]
  train_compile.main(["train_compile", os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml"),
                      *overrides])
  common.emit(common.summary(captured["compiled"], captured["seconds"], args.hlo_out, system="maxtext",
                             model=args.model, topology=args.topology, devices=chips, batch=args.batch, seq=args.seq,
                             overrides=overrides,
                             versions={"maxtext": getattr(maxtext, "__version__", "?"), "jax": jax.__version__}))


if __name__ == "__main__":
  main()
