"""Worker: this machine's measured dense f32 matmul peak (jnp.dot of square matrices, best of several)
and memory read bandwidth (best of a large-array sum and a large matrix-vector product) under JAX/XLA.
Usage (driver only): python benchmarks/peers/cftjax_peak.py SHAPES_JSON (uses `steps` repeats)"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import harness

MATMUL_SIZES = (1024, 2048, 3072)
READ_BYTES = 512 * 2**20  # well beyond the last-level cache


def best_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak(repeats: int) -> dict[str, float]:
  """Best f32 FLOP/s of an n x n @ n x n product over MATMUL_SIZES."""
  dot = jax.jit(jnp.dot)
  rates = {}
  for n in MATMUL_SIZES:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    rates[n] = 2 * n**3 / best_seconds(dot, a, b, repeats=repeats)
  return {"peak_flops": max(rates.values()), "matmul_flops_by_size": rates}


def read_bandwidth(repeats: int) -> dict[str, float]:
  """Best bytes/s of reading READ_BYTES of f32: a full reduction, and a [rows, cols] @ [cols, 8]
  product (the decode step's access pattern)."""
  words = READ_BYTES // 4
  vector = jnp.ones((words,), jnp.float32)
  total = best_seconds(jax.jit(jnp.sum), vector, repeats=repeats)
  matrix = vector.reshape(words // 4096, 4096)
  rhs = jnp.ones((4096, 8), jnp.float32)
  matvec = best_seconds(jax.jit(jnp.dot), matrix, rhs, repeats=repeats)
  rates = {"sum": READ_BYTES / total, "matmul_batch8": READ_BYTES / matvec}
  return {"read_bandwidth": max(rates.values()), "bandwidth_by_kernel": rates}


def main() -> None:
  shapes = harness.shapes_from_argv()
  repeats = max(shapes.steps, 3)
  harness.emit({"system": "peak", **matmul_peak(repeats), **read_bandwidth(repeats),
                "jax": jax.__version__})


if __name__ == "__main__":
  main()
