"""Worker: this machine's measured dense matmul peak (jnp.dot of square matrices in the benchmark's
compute dtype, best of several) and memory read bandwidth (best of a large-array sum and a large
matrix-vector product) under JAX/XLA, on JAX's default backend (a GPU where there is one).
Usage (driver only): python benchmarks/peers/cftjax_peak.py SHAPES_JSON (uses `steps` repeats)"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import harness

# Sizes per backend: squares big enough to reach the peak, reads well beyond the last-level cache.
MATMUL_SIZES = {"cpu": (1024, 2048, 3072), "gpu": (4096, 8192, 16384)}
READ_BYTES = {"cpu": 512 * 2**20, "gpu": 4 * 2**30}


def best_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak(repeats: int, dtype: str, backend: str) -> dict[str, float]:
  """Best FLOP/s of an n x n @ n x n product in dtype over the backend's MATMUL_SIZES."""
  dot = jax.jit(jnp.dot)
  rates = {}
  for n in MATMUL_SIZES[backend]:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    rates[n] = 2 * n**3 / best_seconds(dot, a, b, repeats=repeats)
  return {"peak_flops": max(rates.values()), "matmul_flops_by_size": rates}


def read_bandwidth(repeats: int, backend: str) -> dict[str, float]:
  """Best bytes/s of reading the backend's READ_BYTES of f32: a full reduction, and a [rows, cols] @
  [cols, 8] product (the decode step's access pattern)."""
  read_bytes = READ_BYTES[backend]
  words = read_bytes // 4
  vector = jnp.ones((words,), jnp.float32)
  total = best_seconds(jax.jit(jnp.sum), vector, repeats=repeats)
  matrix = vector.reshape(words // 4096, 4096)
  rhs = jnp.ones((4096, 8), jnp.float32)
  matvec = best_seconds(jax.jit(jnp.dot), matrix, rhs, repeats=repeats)
  rates = {"sum": read_bytes / total, "matmul_batch8": read_bytes / matvec}
  return {"read_bandwidth": max(rates.values()), "bandwidth_by_kernel": rates}


def main() -> None:
  shapes = harness.shapes_from_argv()
  repeats = max(shapes.steps, 3)
  backend = "gpu" if jax.default_backend() == "gpu" else "cpu"
  harness.emit({"system": "peak", **matmul_peak(repeats, shapes.dtype, backend),
                **read_bandwidth(repeats, backend), "matmul_dtype": shapes.dtype,
                "device": jax.devices()[0].device_kind, "jax": jax.__version__})


if __name__ == "__main__":
  main()
