#!/usr/bin/env bash
# Runs every side-by-side benchmark back to back and tees the tables to benchmarks/results/.
# Usage: bash benchmarks/run_all.sh [--quick] [--huge-pages] [--systems NAME ...]
#   --quick: 1 round, 1 timed step / call each; --huge-pages: every system's workers run with
#   GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (see docs/benchmarks.md); --systems: only these of
#   cftjax, transformers+torch, tunix in train_step.py and rollout.py (mfu.py measures cftjax alone
#   and is skipped when cftjax is not among them).
# Python: $PYTHON, else the README's environment .venv/bin/python (make test / make demo create it).
# Needs the peer environments unless --systems cftjax: bash benchmarks/setup.sh
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON="$PWD/.venv/bin/python"
  if [[ ! -x "$PYTHON" ]]; then
    echo "[run_all] $PYTHON not found (run 'make test' to create .venv); using python3" >&2
    PYTHON=python3
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
args=()
systems=()
in_systems=0
for arg in "$@"; do
  case "$arg" in
    --quick) args+=(--rounds 1 --steps 1); in_systems=0 ;;
    --huge-pages) args+=(--huge-pages); in_systems=0 ;;
    --systems) in_systems=1 ;;
    -*) echo "[run_all] unknown argument '$arg'; use --quick, --huge-pages and/or --systems NAME ..." >&2
        exit 2 ;;
    *) if [[ $in_systems == 1 ]]; then systems+=("$arg"); else
         echo "[run_all] unexpected '$arg'; system names go after --systems" >&2; exit 2; fi ;;
  esac
done
side_args=("${args[@]}")
if [[ ${#systems[@]} -gt 0 ]]; then
  side_args+=(--systems "${systems[@]}")
elif [[ $in_systems == 1 ]]; then
  echo "[run_all] --systems needs at least one of: cftjax transformers+torch tunix" >&2; exit 2
fi
out="benchmarks/results/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
echo "[run_all] results -> $out; python $PYTHON; load average $(cut -d' ' -f1-3 /proc/loadavg)"
"$PYTHON" benchmarks/train_step.py "${side_args[@]}" | tee "$out/train_step.md"
"$PYTHON" benchmarks/rollout.py "${side_args[@]}" | tee "$out/rollout.md"
if [[ ${#systems[@]} -eq 0 || " ${systems[*]} " == *" cftjax "* ]]; then
  "$PYTHON" benchmarks/mfu.py "${args[@]}" | tee "$out/mfu.md"
fi
