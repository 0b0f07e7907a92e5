#!/usr/bin/env bash
# Creates the peer systems' own virtual environments for the side-by-side benchmarks:
#   $VENVS/torch : torch (local CPU wheel) + transformers      -> benchmarks/peers/hf_*.py
#   $VENVS/tunix : google-tunix with its jax/flax deps, no torch -> benchmarks/peers/tunix_*.py
#   $VENVS/maxtext-tpu : maxtext[tpu] + jax[tpu] on python3.12  -> benchmarks/peers/maxtext_aot.py
#   $VENVS/tunix-tpu   : google-tunix + jax[tpu] on python3.12  -> benchmarks/peers/tunix_aot.py
#   (the *-tpu ones compile for TPU topologies ahead of time: benchmarks/tpu_compile.py)
# VENVS defaults to benchmarks/.venv (git-ignored). Re-running skips environments that import.
# Usage: bash benchmarks/setup.sh [torch|tunix|maxtext-tpu|tunix-tpu ...] (default: torch tunix)
set -euo pipefail

cd "$(dirname "$0")"
VENVS="${CFTJAX_BENCH_VENVS:-$PWD/.venv}"
PYTHON="${PYTHON:-python3}"
# Pinned to what the project venv runs, so the JAX peers share one jax/XLA build.
TORCH_VERSION=2.13.0
TRANSFORMERS_VERSION=5.24.0
TUNIX_VERSION=0.1.7
JAX_VERSION=0.10.2
FLAX_VERSION=0.12.8
# The TPU ahead-of-time peers: each release with the jax[tpu] (and so libtpu) it was released against.
PYTHON312="${PYTHON312:-python3.12}"
MAXTEXT_VERSION=0.2.5
MAXTEXT_JAX_VERSION=0.11.1
TUNIX_TPU_JAX_VERSION=0.12.0.1

make_venv() {  # make_venv NAME IMPORT_CHECK [PYTHON]
  local dir="$VENVS/$1"
  if [[ -x "$dir/bin/python" ]] && "$dir/bin/python" -c "$2" 2>/dev/null; then
    echo "[setup] $dir is ready"
    return 1
  fi
  # Called as `make_venv ... || return 0`, where set -e does not apply: stop here on any failure.
  if ! "${3:-$PYTHON}" -m venv "$dir"; then
    echo "[setup] '${3:-$PYTHON}' could not create $dir: set PYTHON (or PYTHON312 for the *-tpu venvs) to a working interpreter" >&2
    exit 2
  fi
  "$dir/bin/pip" install --quiet --upgrade pip || exit 1
}

setup_torch() {
  local dir="$VENVS/torch"
  make_venv torch "import torch, transformers" || return 0
  # torch first and pinned: the machine ships this CPU wheel; an unpinned torch pulls a CUDA build.
  "$dir/bin/pip" install --quiet "torch==$TORCH_VERSION"
  "$dir/bin/pip" install --quiet "transformers==$TRANSFORMERS_VERSION" numpy
  echo "[setup] $dir: $("$dir/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
}

setup_tunix() {
  local dir="$VENVS/tunix"
  make_venv tunix "import tunix, jax" || return 0
  "$dir/bin/pip" install --quiet "jax==$JAX_VERSION" "jaxlib==$JAX_VERSION" "flax==$FLAX_VERSION"
  "$dir/bin/pip" install --quiet "google-tunix==$TUNIX_VERSION" "jax==$JAX_VERSION" "flax==$FLAX_VERSION"
  if "$dir/bin/python" -c "import torch" 2>/dev/null; then
    echo "[setup] error: torch got into $dir (a tunix dependency pulled it); remove it with" \
         "'$dir/bin/pip uninstall torch'" >&2
    exit 1
  fi
  echo "[setup] $dir: $("$dir/bin/python" -c 'import importlib.metadata as m; print(*(f"{p} {m.version(p)}" for p in ("google-tunix", "jax", "flax", "optax")))')"
}

report_jax() {  # report_jax DIR PACKAGE
  echo "[setup] $1: $("$1/bin/python" -c "import importlib.metadata as m; print(*(f'{p} {m.version(p)}' for p in ('$2', 'jax', 'jaxlib', 'libtpu')))")"
}

setup_maxtext_tpu() {
  local dir="$VENVS/maxtext-tpu"
  make_venv maxtext-tpu "import maxtext, libtpu" "$PYTHON312" || return 0
  # maxtext declares no dependencies of its own: its [tpu] extra and this jax pull what it needs.
  "$dir/bin/pip" install --quiet "maxtext[tpu]==$MAXTEXT_VERSION" "jax[tpu]==$MAXTEXT_JAX_VERSION"
  report_jax "$dir" maxtext
}

setup_tunix_tpu() {
  local dir="$VENVS/tunix-tpu"
  make_venv tunix-tpu "import tunix, libtpu" "$PYTHON312" || return 0
  "$dir/bin/pip" install --quiet "google-tunix==$TUNIX_VERSION" "jax[tpu]==$TUNIX_TPU_JAX_VERSION"
  report_jax "$dir" google-tunix
}

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(torch tunix)
mkdir -p "$VENVS"
for target in "${targets[@]}"; do
  case "$target" in
    torch) setup_torch ;;
    tunix) setup_tunix ;;
    maxtext-tpu) setup_maxtext_tpu ;;
    tunix-tpu) setup_tunix_tpu ;;
    *) echo "[setup] unknown target '$target'; use torch, tunix, maxtext-tpu and/or tunix-tpu" >&2; exit 2 ;;
  esac
done
