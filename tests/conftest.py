"""Test session set-up: 8 fake CPU devices (unless XLA_FLAGS already sets a count) for sharding tests.
Compiled programs go to a persistent compilation cache shared by the session's processes (pytest-xdist
workers and the CLI subprocesses the tests start inherit it), so a program compiled by one test is
loaded, not recompiled, by the next; the cache is the session's own and is removed when it ends
(unless JAX_COMPILATION_CACHE_DIR was already set). With libtpu installed (the `tpu-compile` extra,
for the TPU compile tests) and no GPU plugin, JAX runs on the CPU only (JAX_PLATFORMS=cpu unless
set): no TPU probe at start-up; the TPU tests compile for topology devices, which need no TPU backend.
Several test processes may load libtpu at once.

Runs before any test module imports jax, so the settings take effect.
"""

import atexit
import importlib.util
import os
import shutil
import tempfile

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_COUNT_FLAG}=8".strip()
if not any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set once, by the session's first process
  _cache_dir = tempfile.mkdtemp(prefix="cftjax-tests-xla-cache-")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  # A size limit turns on the cache's file lock: concurrent processes never read a half-written entry.
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)

# Hypothesis keeps its files in the session's temp dir, not the checkout: test_sandbox compares the
# checkout's entries before and after a sandboxed attack while other workers' property tests run.
_hypothesis_dir = tempfile.mkdtemp(prefix="cftjax-tests-hypothesis-")
atexit.register(shutil.rmtree, _hypothesis_dir, ignore_errors=True)
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", _hypothesis_dir)
