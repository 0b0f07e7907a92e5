"""Test session set-up: 8 fake CPU devices (unless XLA_FLAGS already sets a count) for sharding tests.
With libtpu installed (the `tpu-compile` extra, for the TPU compile tests) and no GPU plugin, JAX
runs on the CPU only (JAX_PLATFORMS=cpu unless set): no TPU probe at start-up; the TPU tests compile
for topology devices, which need no TPU backend. Several test processes may load libtpu at once.

Runs before any test module imports jax, so the settings take effect.
"""

import importlib.util
import os

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_COUNT_FLAG}=8".strip()
if not any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
