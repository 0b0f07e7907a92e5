"""CFT input-pipeline throughput (render, tokenize, mask, pack/pad, batch) on the synthetic world.

Prints tokens per second of wall time and per CPU-second of this process (= per core) for each
mode. Usage: python benchmarks/data_throughput.py [--rows 20000] [--seq-len 2048] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from cftjax import config as config_lib
from cftjax.data import critique, pipeline, synthetic
from cftjax.tokenizer import Tokenizer


def _measure(run) -> tuple[int, float, float]:
  """(tokens, wall seconds, CPU seconds of this process) of run() -> tokens."""
  wall, cpu = time.perf_counter(), time.process_time()
  tokens = run()
  return tokens, time.perf_counter() - wall, time.process_time() - cpu


def _data_section(train_path: str, seq_len: int, batch_size: int, packing: bool):
  """The base config's data section reading `train_path` with the cft template."""
  data = config_lib.base_config().data
  data.train_path, data.template, data.max_seq_len = train_path, "cft", seq_len
  data.batch_size, data.packing = batch_size, packing
  return data


def _pipeline_tokens(data, tokenizer, num_workers: int = 0) -> int:
  """Non-padding tokens of one epoch of the data section's training rows."""
  with pipeline.make_cft_iterator(data, tokenizer, sources=pipeline.train_sources(data),
                                  batch_size=data.batch_size, num_epochs=1,
                                  num_workers=num_workers) as it:
    return sum(int((batch["segment_ids"] > 0).sum()) for batch in it)


def _render_tokens(records, tokenizer) -> int:
  return sum(len(critique.render_sft(r, "cft", tokenizer)[0]) - 1 for r in records)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--rows", type=int, default=20000)
  parser.add_argument("--seq-len", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--workers", type=int, default=2, help="also time num_workers=N (0: skip)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    paths = synthetic.write_world(tmp, seed=0, num_train=args.rows, num_heldout=10, digits=5)
    tokenizer = Tokenizer.from_dir(paths["tokenizer"])
    packed, padded = (_data_section(paths["train"], args.seq_len, args.batch, packing)
                      for packing in (True, False))
    from cftjax.data import readers  # pylint: disable=import-outside-toplevel
    records = readers.load_records(paths["train"])
    runs = [("render+tokenize only", lambda: _render_tokens(records, tokenizer)),
            ("pipeline, packed", lambda: _pipeline_tokens(packed, tokenizer)),
            ("pipeline, padded", lambda: _pipeline_tokens(padded, tokenizer))]
    if args.workers:
      runs.append((f"pipeline, packed, {args.workers} workers",
                   lambda: _pipeline_tokens(packed, tokenizer, args.workers)))
    print(f"{args.rows} synthetic CFT rows, max_seq_len {args.seq_len}, batch {args.batch}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'mode':<34} {'tokens':>10} {'wall s':>8} {'tok/s wall':>12} {'tok/s/core':>12}")
    for name, run in runs:
      tokens, wall, cpu = _measure(run)
      per_core = "n/a (workers)" if "workers" in name else f"{tokens / max(cpu, 1e-9):12,.0f}"
      print(f"{name:<34} {tokens:>10,} {wall:>8.2f} {tokens / wall:>12,.0f} {per_core:>12}")
    mean_len = np.mean([len(r.critique) for r in records[:100]])
    print(f"(mean critique length {mean_len:.0f} chars)")


if __name__ == "__main__":
  main()
