"""AdamW optimizer from a config: learning-rate schedule with warmup, global-norm gradient clipping
and a weight-decay mask chosen by parameter path."""

from __future__ import annotations

from collections.abc import Callable, Mapping
import math
from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")
OPTIM_DEFAULTS: dict[str, Any] = {
    "lr": None,  # required
    "schedule": "cosine",
    "warmup_steps": 0,
    "warmup_ratio": 0.0,
    "min_lr_ratio": 0.0,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "weight_decay": 0.0,
    "grad_clip_norm": 1.0,
    "decay_embeddings": True,
}


def _path_names(path) -> list[str]:
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)).lower())
        break
  return names


def decay_mask(params, decay_embeddings: bool = True):
  """Pytree of bools like params: True where weight decay applies.

  No decay for a leaf whose path has a component containing "norm" or "bias", whose last name is
  "scale" (RMSNorm gains), or, when decay_embeddings is False, a component containing "embed".
  """

  def decays(path, _) -> bool:
    names = _path_names(path)
    if any("norm" in name or "bias" in name for name in names):
      return False
    if names and names[-1] == "scale":
      return False
    return decay_embeddings or not any("embed" in name for name in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def _resolve_config(optim_cfg) -> dict[str, Any]:
  raw = optim_cfg.to_dict() if hasattr(optim_cfg, "to_dict") else dict(optim_cfg)
  unknown = sorted(set(raw) - set(OPTIM_DEFAULTS))
  if unknown:
    raise ValueError(
        f"optim config: unknown key(s) {unknown}; allowed keys: {sorted(OPTIM_DEFAULTS)}")
  cfg = {**OPTIM_DEFAULTS, **raw}
  if cfg["lr"] is None or cfg["lr"] < 0:
    raise ValueError(f"optim config: `lr` must be set to a learning rate >= 0, got {cfg['lr']}")
  if cfg["schedule"] not in SCHEDULES:
    raise ValueError(f"optim config: `schedule` {cfg['schedule']!r} is not one of {SCHEDULES}")
  if cfg["warmup_steps"] and cfg["warmup_ratio"]:
    raise ValueError("optim config: set only one of `warmup_steps` and `warmup_ratio` "
                     "(e.g. warmup_ratio=0 to use warmup_steps)")
  if not 0.0 <= cfg["min_lr_ratio"] <= 1.0:
    raise ValueError(f"optim config: `min_lr_ratio` must be in [0, 1], got {cfg['min_lr_ratio']}")
  return cfg


def make_schedule(cfg: Mapping[str, Any], total_steps: int) -> Callable[[Any], Any]:
  """lr(step): linear warmup 0 -> lr over the warmup steps (HF convention: lr * step / warmup),
  then cosine or linear decay to lr * min_lr_ratio at total_steps, or constant."""
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  lr = cfg["lr"]
  warmup_steps = int(cfg["warmup_steps"] or math.ceil(cfg["warmup_ratio"] * total_steps))
  decay_steps = total_steps - warmup_steps
  if decay_steps < 1 and cfg["schedule"] != "constant":
    raise ValueError(f"optim config: warmup ({warmup_steps} steps) must be shorter than the "
                     f"{total_steps} total steps")
  if cfg["schedule"] == "cosine":
    after_warmup = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg["min_lr_ratio"])
  elif cfg["schedule"] == "linear":
    after_warmup = optax.linear_schedule(lr, lr * cfg["min_lr_ratio"], decay_steps)
  else:
    after_warmup = optax.constant_schedule(lr)
  if not warmup_steps:
    return after_warmup
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, after_warmup], [warmup_steps])


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """(AdamW with optional global-norm clipping, lr schedule) from a dict or ConfigDict.

  Keys (defaults in OPTIM_DEFAULTS): lr, schedule, warmup_steps | warmup_ratio, min_lr_ratio,
  b1, b2, eps, weight_decay, grad_clip_norm (0/None: no clipping), decay_embeddings.
  """
  cfg = _resolve_config(optim_cfg)
  schedule = make_schedule(cfg, total_steps)
  adamw = optax.adamw(
      schedule, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"], weight_decay=cfg["weight_decay"],
      mask=lambda params: decay_mask(params, cfg["decay_embeddings"]))
  if not cfg["grad_clip_norm"]:
    return adamw, schedule
  return optax.chain(optax.clip_by_global_norm(cfg["grad_clip_norm"]), adamw), schedule
