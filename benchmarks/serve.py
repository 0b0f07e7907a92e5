"""`cftjax serve` throughput: requests/s and generated tokens/s at 1, 8 and 32 concurrent clients.

Starts `cftjax serve` in a subprocess on a checkpoint (default: a freshly initialised model the size of
the CPU demo's, with the demo world's tokenizer, written to a temp dir), compiles every batch shape the
measurements can meet first (one request with n = 1, 2, 4, ... up to the most clients, for the
shortest and the longest prompt: the server pads a batch to a power of two rows), then has C client
threads (the official `openai` client) send greedy chat requests of exactly --new-tokens tokens (stop
ids can end one earlier) back to back for --seconds each. The figures exclude compile time.

Usage: python benchmarks/serve.py [--ckpt DIR] [--clients 1 8 32] [--new-tokens 32] [--seconds 20]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import jax
import openai

from cftjax import config as config_lib
from cftjax.data import synthetic
from cftjax.models import checkpoint_io, init_params
from cftjax.models.checkpoint_io import save_model_checkpoint


def demo_sized_checkpoint(out_dir: str) -> str:
  """The CPU demo's model shape (configs/demo_cft.py), randomly initialised, with the world tokenizer."""
  config = config_lib.load_config("configs/demo_cft.py", [("train.run_dir", out_dir)])
  paths = synthetic.write_world(os.path.join(out_dir, "world"), num_train=20, num_heldout=4)
  config.model.tokenizer_dir = paths["tokenizer"]
  cfg, _ = checkpoint_io.build_model(config.model)
  save_model_checkpoint(os.path.join(out_dir, "model"), cfg, init_params(cfg, jax.random.key(0)),
                        paths["tokenizer"])
  return os.path.join(out_dir, "model")


def wait_for(base: str, proc: subprocess.Popen) -> None:
  while proc.poll() is None:
    try:
      with urllib.request.urlopen(f"{base}/health", timeout=2):
        return
    except OSError:
      time.sleep(0.5)
  raise SystemExit(f"cftjax serve exited with {proc.returncode}")


def _messages(i: int) -> list[dict[str, str]]:
  return [{"role": "user", "content": f"Check solution {i}: 2 + 2 = 4."}]


def warm_up(client: openai.OpenAI, model: str, max_clients: int, new_tokens: int) -> None:
  """Compiles each padded batch size (powers of two up to max_clients) for client 0's and the last
  client's prompt: a request with n choices runs as one batch of n rows."""
  rows = 1
  while True:
    for i in sorted({0, max_clients - 1}):
      client.chat.completions.create(model=model, messages=_messages(i), n=rows, max_tokens=new_tokens,
                                     temperature=0)
    if rows >= max_clients:
      return
    rows *= 2


def measure(client: openai.OpenAI, model: str, clients: int, new_tokens: int, seconds: float) -> dict:
  stop_at = time.monotonic() + seconds
  counts = {"requests": 0, "tokens": 0}
  lock = threading.Lock()

  def worker(i: int) -> None:
    while time.monotonic() < stop_at:
      reply = client.chat.completions.create(model=model, messages=_messages(i), max_tokens=new_tokens,
                                             temperature=0)
      with lock:
        counts["requests"] += 1
        counts["tokens"] += reply.usage.completion_tokens

  start = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    list(pool.map(worker, range(clients)))
  elapsed = time.monotonic() - start
  return {"clients": clients, "requests_per_s": counts["requests"] / elapsed,
          "tokens_per_s": counts["tokens"] / elapsed, "requests": counts["requests"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ckpt", default=None)
  parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=20.0)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = args.ckpt or demo_sized_checkpoint(tmp)
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cftjax.cli", "--log_level", "WARNING", "serve", "--ckpt", ckpt,
                             "--port", str(port), "--served-model-name", "bench", "--max-batch",
                             str(max(args.clients))])
    try:
      base = f"http://127.0.0.1:{port}"
      wait_for(base, proc)
      client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
      warm_up(client, "bench", max(args.clients), args.new_tokens)
      rows = []
      for clients in args.clients:
        rows.append(measure(client, "bench", clients, args.new_tokens, args.seconds))
        print(json.dumps(rows[-1]), flush=True)
    finally:
      proc.terminate()
      proc.wait()
  print("\n| concurrent clients | requests/s | generated tokens/s |\n|---|---|---|")
  for row in rows:
    print(f"| {row['clients']} | {row['requests_per_s']:.2f} | {row['tokens_per_s']:.1f} |")
  print(f"load average at the end: {open('/proc/loadavg', encoding='utf-8').read().split()[:3]}")


if __name__ == "__main__":
  main()
