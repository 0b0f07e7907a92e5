#!/usr/bin/env bash
# Runs every side-by-side benchmark back to back and tees the tables to benchmarks/results/.
# Usage: bash benchmarks/run_all.sh [--quick] [--huge-pages]
#   --quick: 1 round, 1 timed step / call each; --huge-pages: every system's workers run with
#   GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (see docs/benchmarks.md)
# Needs the peer environments: bash benchmarks/setup.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-/work/venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
args=()
for arg in "$@"; do
  case "$arg" in
    --quick) args+=(--rounds 1 --steps 1) ;;
    --huge-pages) args+=(--huge-pages) ;;
    *) echo "[run_all] unknown argument '$arg'; use --quick and/or --huge-pages" >&2; exit 2 ;;
  esac
done
out="benchmarks/results/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
echo "[run_all] results -> $out; load average $(cut -d' ' -f1-3 /proc/loadavg)"
"$PYTHON" benchmarks/train_step.py "${args[@]}" | tee "$out/train_step.md"
"$PYTHON" benchmarks/rollout.py "${args[@]}" | tee "$out/rollout.md"
"$PYTHON" benchmarks/mfu.py "${args[@]}" | tee "$out/mfu.md"
