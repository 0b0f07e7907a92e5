#!/usr/bin/env bash
# The GPU part of the benchmarks in one prepared run (docs/benchmarks.md, "GPU").
#
#   bash benchmarks/gpu.sh fetch      # where pip reaches PyPI: tunix's wheels (Python 3.12) -> .whl/
#   bash benchmarks/gpu.sh run OUT    # on the GPU machine: tests, tables and logs -> OUT/
#   CFTJAX_GPU_SH_SMOKE=1 bash benchmarks/gpu.sh run OUT   # the same steps on tiny shapes (any machine)
#
# `run` expects a python3 with CUDA jax, flax, optax, orbax, torch and transformers (the device image);
# tunix and the modules it imports beyond those are installed from .whl/ into a temporary directory.
# It runs, each under its own time limit so one hang cannot eat the others' time:
#   1. the GPU tests (cuDNN attention against the masked XLA attention);
#   2. the side-by-side train step and rollout of the CPU tables (same shapes), in bf16;
#   3. MFU of a Qwen2.5-1.5B-shaped CFT step at 4096 tokens per row, and its decode against the
#      HBM roofline (bytes per step over the measured read bandwidth).
set -uo pipefail
cd "$(dirname "$0")/.."

TUNIX_WHEELS=(google-tunix==0.1.7 google-metrax==0.2.4 clu==0.0.12 perfetto==0.59.1 tensorboardX==2.6.5)
# Qwen2.5-1.5B: hidden 1536, 28 layers, 12 query / 2 KV heads (head_dim 128), intermediate 8960,
# vocab 151936, tied embeddings.
QWEN25_1P5B=(--hidden 1536 --intermediate 8960 --layers 28 --heads 12 --kv-heads 2 --vocab 151936
             --tie-embeddings)
SMOKE=()  # later flags win: tiny shapes to check this script where there is no GPU
[[ -n "${CFTJAX_GPU_SH_SMOKE:-}" ]] && SMOKE=(--hidden 64 --intermediate 128 --layers 2 --heads 4
                                            --kv-heads 2 --vocab 512 --warmup 0 --steps 1)

fetch() {
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${TUNIX_WHEELS[@]}"
}

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a limit, output to OUT/NAME.md
  local name=$1 limit=$2; shift 2
  echo "[gpu.sh] $(date +%T) $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.md" 2>"$OUT/$name.err"
  local rc=$?
  tail -n 25 "$OUT/$name.md"
  [[ $rc == 0 ]] || { echo "[gpu.sh] $name exit $rc; stderr tail:"; tail -n 15 "$OUT/$name.err"; }
}

run() {
  OUT=${1:?usage: bash benchmarks/gpu.sh run OUT_DIR}
  mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/cftjax_site \
      .whl/*.whl && export PYTHONPATH=/tmp/cftjax_site
  fi
  # The peers' "environments" here are the image's own python3 (torch) and python3 + .whl (tunix).
  export CFTJAX_BENCH_VENVS=/tmp/cftjax_bench_venvs
  for peer in torch tunix; do  # a wrapper, not a link: python3 may be a venv's, found by its own path
    mkdir -p "$CFTJAX_BENCH_VENVS/$peer/bin"
    printf '#!/bin/sh\nexec %q "$@"\n' "$(command -v python3)" >"$CFTJAX_BENCH_VENVS/$peer/bin/python"
    chmod +x "$CFTJAX_BENCH_VENVS/$peer/bin/python"
  done
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"

  step gpu_tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_attention.py
  step train_step_bf16 160 python3 benchmarks/train_step.py --dtype bfloat16 --rounds 1 "${SMOKE[@]}"
  step rollout_bf16 130 python3 benchmarks/rollout.py --dtype bfloat16 --rounds 1 "${SMOKE[@]}"
  local hiddens=1536 seq=4096
  [[ ${#SMOKE[@]} == 0 ]] || { hiddens=64; seq=128; }
  step mfu_qwen25_1p5b 200 python3 benchmarks/mfu.py --dtype bfloat16 --rounds 1 "${QWEN25_1P5B[@]}" \
    "${SMOKE[@]}" --hiddens $hiddens --batch 4 --seq $seq
  echo "[gpu.sh] $(date +%T) done"
}

case "${1:-}" in
  fetch) fetch ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash benchmarks/gpu.sh fetch | run OUT_DIR" >&2; exit 2 ;;
esac
