"""`cftjax train` as a function: one config in, one run out. Prepares the demo world when asked,
trains the run that model.init_from_run names first when it has not finished (model.warmstart_config:
the warm start of a GRPO policy or of a LoRA run's frozen base), and runs the objective's trainer
(train.objective: cft | grpo) with the held-out verdict evaluation plugged in."""

from __future__ import annotations

import logging
import os
from typing import Any

from cftjax import config as config_lib
from cftjax import parallel
from cftjax.data import synthetic
from cftjax.eval import heldout
from cftjax.models import checkpoint_io
from cftjax.train import cft, grpo
from cftjax.train import run as run_lib

log = logging.getLogger(__name__)

TRAINERS = {"cft": cft.train, "grpo": grpo.train}


def _needs_warm_start(config: Any) -> bool:
  model = config.model
  return bool(model.init_from_run and model.warmstart_config) and run_lib.finished_summary(
      run_lib.init_run_dir(config)) is None


def check_before_start(config: Any) -> None:
  """The checks that need no data, model or devices (run before anything is written): the
  objective, train.steps and the warm-start config file."""
  objective = config.train.objective
  if objective not in TRAINERS:
    raise config_lib.ConfigError(f"config.train.objective={objective!r}; choose one of {sorted(TRAINERS)}")
  if config.train.steps < 0:
    raise config_lib.ConfigError(
        f"train.steps={config.train.steps}: it must be >= 0 (0 = data.num_epochs passes over the "
        "training rows); set --config.train.steps to a step count")
  if _needs_warm_start(config):
    path = config.model.warmstart_config.partition(":")[0]
    if not os.path.isfile(path):
      relative = "" if os.path.isabs(path) else f" (relative to the working directory {os.getcwd()})"
      raise config_lib.ConfigError(
          f"model.warmstart_config={config.model.warmstart_config!r}: no such config file{relative}; a "
          "relative path set in a config file is relative to that file's directory, one given as "
          "--config.model.warmstart_config to the working directory; fix the path")


def warm_start(config: Any) -> dict[str, Any] | None:
  """Trains (or finishes training) model.warmstart_config, a CFT config, into model.init_from_run's run
  directory unless that run has already finished; it uses this run's synthetic world. Returns the
  warm start's summary when it ran (None otherwise)."""
  model = config.model
  if not _needs_warm_start(config):
    return None
  run_dir = run_lib.init_run_dir(config)
  overrides = [("train.run_dir", run_dir)]
  if model.warmstart_steps:
    overrides.append(("train.steps", str(model.warmstart_steps)))
  if config.data.world_dir:
    overrides.append(("data.world_dir", config.data.world_dir))
    overrides += [(f"data.world.{key}", str(value)) for key, value in config.data.world.items()]
  log.info("model.init_from_run=%s is not trained yet: training %s there first (%s)",
           model.init_from_run, model.warmstart_config, overrides)
  summary = train(config_lib.load_config(model.warmstart_config, overrides))
  log.info("warm start %s:\n%s", "interrupted" if summary["preempted"] else "done",
           run_lib.format_summary(summary))
  return summary


def check_init_run_world(config: Any) -> None:
  """Raises when model.init_from_run was trained on this run's synthetic world directory as written
  with other data.world settings (e.g. a warm start left over from an older world)."""
  if not (config.model.init_from_run and config.data.synthetic_world):
    return
  source = checkpoint_io.read_run_config(run_lib.init_run_dir(config)).data
  if source.get("world_dir") != config.data.world_dir:
    return
  defaults = config_lib.base_config().data.world  # keys a run written before they existed lacks
  written = {key: source.world.get(key, defaults.get(key)) for key in config.data.world}
  differing = {key: (written[key], value) for key, value in config.data.world.items()
               if written[key] != value}
  if differing:
    raise config_lib.ConfigError(
        f"model.init_from_run={config.model.init_from_run!r} was trained on {config.data.world_dir} with "
        f"other data.world settings (it, this run: {differing}): delete that run to train it again "
        "on this world, or point model.init_from_run elsewhere")


def train(config: Any) -> dict[str, Any]:
  """Runs (or resumes) the run of `config`; returns its summary (`cftjax.train.run.RunLoop.loop`), or
  the warm start's when a signal stopped it."""
  check_before_start(config)
  parallel.maybe_initialize_distributed()  # before anything touches JAX's devices
  objective = config.train.objective
  synthetic.ensure_world(config)
  warm = warm_start(config)
  if warm is not None and warm["preempted"]:
    return warm  # stopped by a signal: this run starts when a rerun finishes the warm start
  check_init_run_world(config)
  return TRAINERS[objective](config, heldout.make_verdict_evaluator)
