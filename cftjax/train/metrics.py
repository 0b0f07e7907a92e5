"""Training metrics: model FLOPs and MFU against device peaks, and the process-0 writer that sends
each step's metrics to a tqdm bar, RUN_DIR/metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cftjax.models import ModelConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Dense bf16 peak FLOP/s per chip, matched by substring of `device.device_kind` (first match wins,
# so more specific names come first).
BF16_PEAK_FLOPS = (
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v4", 275e12),
    ("H200", 989e12),  # SXM, dense (no sparsity)
    ("H100", 989e12),  # SXM, dense; PCIe parts are lower (756e12)
    ("A100", 312e12),
)


def matmul_params(cfg: ModelConfig) -> int:
  """All params but an untied input embedding (a lookup, no FLOPs); the few norm scales count too."""
  return cfg.num_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward model FLOPs per token, PaLM convention (no causal halving, no remat).

  6 * matmul_params for the weight matmuls, plus 12 * layers * (heads * head_dim) * seq_len for the
  attention scores and their weighted sum over a full seq_len x seq_len block.
  """
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return 6.0 * matmul_params(cfg) + attention


def device_peak_flops(device: jax.Device) -> float | None:
  """The table's bf16 peak for an accelerator chip, None when the kind is not in the table."""
  kind = device.device_kind
  for name, peak in BF16_PEAK_FLOPS:
    if name.lower() in kind.lower():
      return peak
  return None


def measure_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
  """A quick float32 matmul throughput measurement of this host's default backend (FLOP/s)."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = matmul(a)
  out.block_until_ready()
  return 2.0 * size**3 * repeats / (time.perf_counter() - start)


def total_peak_flops(cpu_peak_flops: float = 0.0) -> float:
  """Peak FLOP/s of all devices in the job; on CPU `cpu_peak_flops` per host or a measured matmul."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    per_host = cpu_peak_flops or measure_matmul_flops()
    return per_host * jax.process_count()
  peak = device_peak_flops(device)
  if peak is None:
    log.warning("no peak FLOP/s known for device kind %r; MFU will not be reported", device.device_kind)
    return math.nan
  return peak * jax.device_count()


class MetricsWriter:
  """Writes metrics on process 0 only (JSONL, TensorBoard, tqdm); a no-op elsewhere.

  Each record is `{"step": int, "split": "train" | "eval", **scalars}`. Appends to an existing
  metrics.jsonl, so a resumed run continues the same file.
  """

  def __init__(self, run_dir: str, total_steps: int, *, initial_step: int = 0,
               tensorboard: bool = True, progress_bar: bool = True):
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = self._bar = None
    if not self.enabled:
      return
    os.makedirs(run_dir, exist_ok=True)
    self._jsonl = open(os.path.join(run_dir, METRICS_FILE), "a")
    if tensorboard:
      import tensorboardX  # deferred: only process 0 writes events
      self._tb = tensorboardX.SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR))
    if progress_bar:
      import tqdm
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, desc="train")

  def write(self, step: int, scalars: dict[str, Any], split: str = "train") -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in values.items():
        if math.isfinite(value):
          self._tb.add_scalar(f"{split}/{name}", value, int(step))
      self._tb.flush()
    if self._bar is not None:
      shown = ("loss", "accuracy", "lr", "mfu") if split == "train" else tuple(values)
      self._bar.set_postfix({f"{split}_{k}" if split != "train" else k: f"{values[k]:.4g}"
                             for k in shown if k in values}, refresh=False)

  def advance(self, step: int) -> None:
    """Moves the progress bar to `step`."""
    if self._bar is not None and step > self._bar.n:
      self._bar.update(step - self._bar.n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


class ThroughputMeter:
  """Turns step counts, token counts and wall time between two log points into rates and MFU."""

  def __init__(self, flops_per_token: float, peak_flops: float):
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self.reset()

  def reset(self) -> None:
    self._start = time.perf_counter()
    self._steps = 0
    self._tokens = 0

  def add_step(self, tokens: int) -> None:
    """Counts one optimizer step that processed `tokens` non-padding tokens."""
    self._steps += 1
    self._tokens += tokens

  def rates(self) -> dict[str, float]:
    """step_time_s, tokens_per_s and mfu since the last reset (call after syncing the device)."""
    elapsed = max(time.perf_counter() - self._start, 1e-9)
    tokens_per_s = self._tokens / elapsed
    return {"step_time_s": elapsed / max(self._steps, 1), "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak_flops}


def count_tokens(segment_ids: np.ndarray) -> int:
  """Non-padding tokens of a host-local batch (segment_ids: [batch, seq], 0 = padding)."""
  return int(np.count_nonzero(segment_ids))
