"""Reading what a training run writes, for tests that watch a run from outside."""

from __future__ import annotations

import json
import os


def metric_rows(run_dir: str) -> list[dict]:
  """The complete rows of RUN_DIR/metrics.jsonl so far (a line still being written is left out)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]
