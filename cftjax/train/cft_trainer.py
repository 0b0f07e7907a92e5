"""The CFT training loop: `train(config) -> summary`. Wires model, data, optimizer, sharded step,
metrics, held-out evaluation and checkpoints (resume, periodic, final, on SIGTERM) together."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from cftjax import config as config_lib
from cftjax import parallel
from cftjax.data import pipeline, synthetic
from cftjax.models import ConfigError as ModelConfigError
from cftjax.models import ModelConfig
from cftjax.tokenizer import Tokenizer
from cftjax.train import accumulation
from cftjax.train import checkpoint as checkpoint_lib
from cftjax.train import metrics as metrics_lib
from cftjax.train import optimizer as optimizer_lib
from cftjax.train import run_loop
from cftjax.train import sft_step as sft_step_lib
from cftjax.train import state as state_lib
from cftjax.train.verdict_eval import HeldOutEvaluator

log = logging.getLogger(__name__)

WORLD_DIR = "world"


# ------------------------------------------------------------------------------------------------
# Set-up pieces.


def ensure_synthetic_world(config: Any) -> None:
  """Writes the synthetic critique world (if missing) and points unset data/tokenizer keys at it.

  A world already in data.world_dir is used as written: data.world keys that differ from it are
  logged and set to the written values, so the run's config.json describes the data it trained on.
  """
  world_dir = config.data.world_dir or os.path.join(config.train.run_dir, WORLD_DIR)
  world = config.data.world
  if jax.process_index() == 0 and synthetic.written_world_params(world_dir) is None:
    synthetic.write_world(world_dir, seed=config.data.seed, **world)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("synthetic world written")
  written = synthetic.written_world_params(world_dir)
  if written is None:
    raise FileNotFoundError(f"no synthetic world in data.world_dir={world_dir!r} on process "
                            f"{jax.process_index()}: process 0 writes it, so it must be on a "
                            "filesystem every host sees")
  differing = {key: (value, written[key]) for key, value in world.items()
               if key in written and written[key] != value}
  if differing:
    log.warning("data.world_dir=%s holds a world written with other data.world settings (asked, "
                "written: %s); using it as written. Point data.world_dir at a fresh directory for "
                "a new world", world_dir, differing)
    for key, (_, value) in differing.items():
      world[key] = value
  if written["seed"] != config.data.seed:
    log.warning("data.world_dir=%s holds a world written with seed %d; data.seed=%d only seeds the "
                "shuffle here", world_dir, written["seed"], config.data.seed)
  train_file = os.path.join(world_dir, "train.jsonl")
  config.data.world_dir = world_dir
  config.data.train_path = config.data.train_path or train_file
  config.data.eval_path = config.data.eval_path or os.path.join(world_dir, "heldout.jsonl")
  config.model.tokenizer_dir = config.model.tokenizer_dir or os.path.join(world_dir, "tokenizer")


def build_model(config: Any) -> tuple[ModelConfig, Tokenizer]:
  """(model config with the run's compute settings, tokenizer)."""
  model = config.model
  if model.init_from:
    model_cfg, tokenizer_dir = checkpoint_lib.init_model_config(model.init_from)
    tokenizer_dir = model.tokenizer_dir or tokenizer_dir
    if not tokenizer_dir:
      raise config_lib.ConfigError(f"model.init_from={model.init_from!r} holds no tokenizer/; set "
                                   "--config.model.tokenizer_dir")
  else:
    if not model.tokenizer_dir:
      raise config_lib.ConfigError("a model trained from scratch needs --config.model.tokenizer_dir "
                                   "(or --config.model.init_from, a converted checkpoint)")
    tokenizer_dir = model.tokenizer_dir
  tokenizer = Tokenizer.from_dir(tokenizer_dir)
  if not model.init_from:
    arch = model.arch.to_dict()
    arch["vocab_size"] = arch["vocab_size"] or tokenizer.vocab_size
    model_cfg = ModelConfig(**arch, param_dtype=model.param_dtype)
  model_cfg = with_run_settings(model_cfg, model)
  tokenizer.check_fits_model(model_cfg.vocab_size)
  return model_cfg, tokenizer


def with_run_settings(model_cfg: ModelConfig, model: Any) -> ModelConfig:
  """model_cfg with the run's compute settings: config.model's dtype, remat and attention."""
  try:  # run configs written before model.attention existed read as "xla"
    return model_cfg.replace(dtype=model.dtype, remat=model.remat,
                             attention=model.get("attention", "xla"))
  except ModelConfigError as e:
    raise config_lib.ConfigError(f"config.model: {e}") from None


def check_attention_backend(model_cfg: ModelConfig) -> None:
  """Refuses to train with cuDNN attention where JAX has no GPU (sampling never uses it)."""
  if model_cfg.attention == "cudnn" and jax.default_backend() != "gpu":
    raise config_lib.ConfigError(f"model.attention='cudnn' runs on GPUs only (JAX's backend here is "
                                 f"{jax.default_backend()!r}); set --config.model.attention=xla")


def train_data_config(config: Any) -> dict[str, Any]:
  """The pipeline config (cftjax.data.pipeline) of the training stream."""
  data = config.data
  if data.sources:
    sources = [dict(s) for s in data.sources]
  elif data.train_path:
    sources = [{"path": p.strip(), "format": data.format} for p in data.train_path.split(",")]
  else:
    raise config_lib.ConfigError("no training data: set --config.data.train_path (or data.sources)")
  if data.packing and config.model.attention == "cudnn":
    raise config_lib.ConfigError("model.attention='cudnn' takes one sequence per row: set "
                                 "--config.data.packing=False, or --config.model.attention=xla")
  return {"sources": sources, "template": data.template, "max_seq_len": data.max_seq_len,
          "batch_size": data.batch_size, "packing": data.packing, "length_policy": data.length_policy,
          "on_bad_row": data.on_bad_row, "seed": data.seed, "num_workers": data.num_workers,
          # An explicit step count repeats the data as needed; otherwise num_epochs bounds it.
          "num_epochs": None if config.train.steps else data.num_epochs}


def count_batches(data_cfg: dict[str, Any], tokenizer: Tokenizer) -> int:
  """Batches in `data_cfg`'s num_epochs passes, counted by a dry pass (exact with packing and drops).

  Each process counts its own shard; all take the smallest count.
  """
  iterator = pipeline.make_sft_iterator(data_cfg, tokenizer, jax.process_index(), jax.process_count())
  count = sum(1 for _ in iterator)
  iterator.close()
  if jax.process_count() > 1:
    count = int(np.min(multihost_utils.process_allgather(np.int64(count))))
  if count == 0:
    raise ValueError(f"the training data yields no batch: check data.train_path and the length "
                     f"policy counts {iterator.length_counts}")
  log.info("%d epoch(s) of training data = %d optimizer steps", data_cfg["num_epochs"], count)
  return count


def abstract_train_state(model_cfg: ModelConfig, tx: Any, mesh: Any, rules: Any, seed: int) -> Any:
  """The TrainState of ShapeDtypeStructs with their target shardings (restore target)."""
  params = state_lib.abstract_master_params(model_cfg)
  shapes = state_lib.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=jax.eval_shape(tx.init, params),
      rng=jax.eval_shape(lambda key: jax.random.split(key)[1], jax.random.PRNGKey(seed)))
  return checkpoint_lib.abstract_with_shardings(
      shapes, state_lib.train_state_shardings(model_cfg, tx, mesh, rules))


def make_evaluator(config: Any, model_cfg: ModelConfig, tokenizer: Tokenizer, mesh: Any, rules: Any
                   ) -> HeldOutEvaluator | None:
  """The held-out evaluator, or None when there is no eval data or nothing to evaluate."""
  if not config.data.eval_path or not (config.eval.loss_batches or config.eval.verdict_examples):
    return None
  if config.eval.loss_batches:
    accumulation.check_divisible(config.eval.batch_size, 1, mesh, rules, "eval.batch_size")
  eval_step = sft_step_lib.make_eval_step(model_cfg, mesh, rules, chunk_size=config.train.chunk_size,
                                          compute_dtype=config.model.dtype)
  return HeldOutEvaluator(config, model_cfg, tokenizer, mesh, rules, eval_step)


class TrainingDivergedError(RuntimeError):
  """Too many consecutive updates with a NaN / inf loss or gradient (train.max_consecutive_nonfinite)."""


class NonFiniteGuard:
  """Counts the updates the train step skipped for a non-finite loss or gradient (`update_skipped`);
  raises TrainingDivergedError once `limit` (> 0) come in a row. The count restarts on resume."""

  def __init__(self, limit: int):
    self.limit, self.total, self.consecutive = limit, 0, 0

  def observe(self, step: int, update_skipped: float) -> None:
    if not update_skipped:
      self.consecutive = 0
      return
    self.total += 1
    self.consecutive += 1
    log.warning("step %d: the loss or gradients are NaN/inf; the update was skipped (%d in a row, %d "
                "in total)", step, self.consecutive, self.total)
    if self.limit and self.consecutive >= self.limit:
      raise TrainingDivergedError(
          f"step {step}: the loss or gradients were NaN/inf in {self.consecutive} consecutive updates "
          f"(train.max_consecutive_nonfinite={self.limit}), so the run stopped; lower optim.lr, check the "
          "data, or resume from the last checkpoint")


# ------------------------------------------------------------------------------------------------
# The loop.


class _Run(run_loop.RunLoop):
  """Everything one CFT `train` call builds; `RunLoop.loop()` runs the steps."""

  def __init__(self, config: Any):
    self.config = config
    self.run_dir = config.train.run_dir
    if config.data.synthetic_world:
      ensure_synthetic_world(config)
    config_lib.write_run_config(self.run_dir, config, write=jax.process_index() == 0)
    self.config_record = config_lib.to_plain_dict(config)
    self.mesh = parallel.make_mesh(config.mesh)
    self.rules = parallel.LOGICAL_RULES
    self.model_cfg, self.tokenizer = build_model(config)
    check_attention_backend(self.model_cfg)
    accumulation.check_divisible(config.data.batch_size, config.train.micro_batches, self.mesh, self.rules,
                                 "data.batch_size")
    self.data_cfg = train_data_config(config)
    self.total_steps = config.train.steps or count_batches(self.data_cfg, self.tokenizer)
    self.tx, self.schedule = optimizer_lib.make_optimizer(config.optim, self.total_steps)
    self.checkpoints = checkpoint_lib.RunCheckpoints(
        self.run_dir, max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save, best_metric=config.checkpoint.best_metric,
        best_mode=config.checkpoint.best_mode)
    self.data = pipeline.make_sft_iterator(self.data_cfg, self.tokenizer, jax.process_index(),
                                           jax.process_count())
    self.state = self._initial_state()
    self.step = int(jax.device_get(self.state.step))
    self.sft_step = sft_step_lib.make_sft_step(
        self.model_cfg, self.tx, self.mesh, self.rules, micro_batches=config.train.micro_batches,
        chunk_size=config.train.chunk_size, z_loss_weight=config.train.z_loss_weight,
        compute_dtype=config.model.dtype, schedule=self.schedule)
    self.evaluator = make_evaluator(config, self.model_cfg, self.tokenizer, self.mesh, self.rules)
    self.nonfinite = NonFiniteGuard(config.train.max_consecutive_nonfinite)
    seq_len = config.data.max_seq_len
    self.meter = metrics_lib.ThroughputMeter(
        metrics_lib.train_flops_per_token(self.model_cfg, seq_len),
        metrics_lib.total_peak_flops(config.train.cpu_peak_flops))
    self.writer = metrics_lib.MetricsWriter(
        self.run_dir, self.total_steps, initial_step=self.step,
        tensorboard=config.logging.tensorboard, progress_bar=config.logging.progress_bar)

  def _initial_state(self) -> state_lib.TrainState:
    """The latest checkpoint's state (and data position) if there is one, else a fresh state."""
    config = self.config
    latest = self.checkpoints.latest_step()
    if latest is not None:
      abstract = abstract_train_state(self.model_cfg, self.tx, self.mesh, self.rules, config.train.seed)
      state, data_state = self.checkpoints.restore(latest, abstract)
      self.data.set_state(data_state)
      log.info("resumed %s from step %d", self.run_dir, latest)
      return state
    init_params = None
    if config.model.init_from:
      shardings = state_lib.train_state_shardings(self.model_cfg, self.tx, self.mesh, self.rules)
      init_params = checkpoint_lib.load_init_params(config.model.init_from, shardings.params)
    return state_lib.create_train_state(self.model_cfg, self.tx, jax.random.PRNGKey(config.train.seed),
                                        self.mesh, self.rules, init_params)

  def on_start(self) -> None:
    self.meter.reset()

  def train_step(self, log_now: bool) -> dict[str, float]:
    host_batch = next(self.data)
    self.state, step_metrics = self.sft_step(
        self.state, parallel.host_local_to_global(host_batch, self.mesh, self.rules))
    self.nonfinite.observe(self.step + 1, float(step_metrics["update_skipped"]))  # waits for the step
    self.meter.add_step(metrics_lib.count_tokens(host_batch["segment_ids"]) * jax.process_count())
    if not log_now:
      return {}
    metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    metrics |= self.meter.rates() | {"skipped_updates": float(self.nonfinite.total)}
    self.meter.reset()
    return metrics


def train(config: Any) -> dict[str, Any]:
  """Trains (or resumes) the run in config.train.run_dir; returns and writes its summary.

  The summary holds steps, total_steps, start_step, preempted (stopped by SIGTERM after saving),
  final_train_metrics, initial_eval / final_eval (held-out metrics before and after, when evaluated),
  best_value (of checkpoint.best_metric), data_counts (kept / dropped examples) and wall_time_s.
  """
  parallel.maybe_initialize_distributed()
  return run_loop.run_and_summarize(_Run(config))


def format_summary(summary: dict[str, Any]) -> str:
  """A before/after table of the held-out metrics and a line about the run."""
  lines = [f"run {summary['run_dir']}: steps {summary['start_step']} -> {summary['steps']} of "
           f"{summary['total_steps']} in {summary['wall_time_s']:.1f} s"
           + (" (preempted: checkpoint saved)" if summary["preempted"] else "")]
  before, after = summary.get("initial_eval", {}), summary.get("final_eval", {})
  names = sorted(set(before) | set(after))
  if names:
    width = max(len(n) for n in names)
    lines.append(f"{'metric':<{width}}  {'before':>8}  {'after':>8}")
    for name in names:
      cells = [f"{d[name]:8.4f}" if name in d and math.isfinite(d[name]) else f"{'-':>8}"
               for d in (before, after)]
      lines.append(f"{name:<{width}}  {cells[0]}  {cells[1]}")
  return "\n".join(lines)
