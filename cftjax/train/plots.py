"""`cftjax plot RUN_DIR`: PNG curves of a run's metrics.jsonl (train loss, accuracy, lr, grad norm and
every eval metric), one file per metric under RUN_DIR/plots."""

from __future__ import annotations

import collections
import json
import logging
import math
import os

from cftjax.train.run import METRICS_FILE

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
TRAIN_METRICS = ("loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "mfu")


def read_metrics(run_dir: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
  """{split: {metric: [(step, value), ...]}} from RUN_DIR/metrics.jsonl (later rows for a step win)."""
  path = os.path.join(run_dir, METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {run_dir!r} a cftjax run directory?")
  series: dict[str, dict[str, dict[int, float]]] = collections.defaultdict(lambda: collections.defaultdict(dict))
  bad_rows = 0
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      try:
        row = json.loads(line)
        step, split = int(row.pop("step")), row.pop("split", "train")
      except (json.JSONDecodeError, KeyError, ValueError):
        bad_rows += 1  # e.g. a line cut short by a kill
        log.debug("%s:%d: skipped unreadable row", path, line_number)
        continue
      for name, value in row.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          series[split][name][step] = float(value)
  if bad_rows:
    log.warning("%s: skipped %d unreadable rows", path, bad_rows)
  return {split: {name: sorted(points.items()) for name, points in metrics.items()}
          for split, metrics in series.items()}


def plot_run(run_dir: str) -> list[str]:
  """Writes one PNG per train metric in TRAIN_METRICS and per eval metric; returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metrics = read_metrics(run_dir)
  wanted = [("train", name) for name in TRAIN_METRICS if name in metrics.get("train", {})]
  wanted += [("eval", name) for name in sorted(metrics.get("eval", {}))]
  out_dir = os.path.join(run_dir, PLOTS_DIR)
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for split, name in wanted:
    steps, values = zip(*metrics[split][name])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, values, marker="o" if len(steps) < 30 else None)
    if name.endswith("loss") and min(values) > 0:
      ax.set_yscale("log")  # losses span orders of magnitude
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.set_title(f"{split} {name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{split}_{name}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths
