"""A real `cftjax serve` subprocess for tests, and a free local port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(ckpt: str, *args: str, timeout_s: float = 180) -> tuple[str, subprocess.Popen]:
  """(http://127.0.0.1:PORT, the process) of `cftjax serve --ckpt ckpt *args` once /health answers;
  fails the test with the server's output if it exits or does not answer within timeout_s."""
  port = free_port()
  proc = subprocess.Popen([sys.executable, "-m", "cftjax.cli", "serve", "--ckpt", ckpt, "--port", str(port), *args],
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  base = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
        if json.load(response)["status"] == "ok":
          return base, proc
    except OSError:
      pass
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"cftjax serve did not come up:\n{proc.stdout.read()}")
    time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> tuple[int, str]:
  """SIGTERM (uvicorn shuts down gracefully, then re-raises it); (exit code, the server's output)."""
  proc.terminate()
  code = proc.wait(timeout=60)
  return code, proc.stdout.read()
