"""Test session set-up: 8 fake CPU devices (unless XLA_FLAGS already sets a count) for sharding tests.

Runs before any test module imports jax, so the flag takes effect.
"""

import os

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_COUNT_FLAG}=8".strip()
