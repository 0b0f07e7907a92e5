"""Critique fine-tuning end to end: the jitted, sharded CFT step (masked cross-entropy over the
critique tokens, gradient accumulation, one division by the global target-token count) and the
training run `train(config) -> summary` (data, model, optimizer, step loop, eval, checkpoints)."""

from __future__ import annotations

from collections.abc import Callable
import logging
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import optax

from cftjax import config as config_lib
from cftjax import parallel
from cftjax.data import pipeline
from cftjax.models import ModelConfig
from cftjax.models import checkpoint_io
from cftjax.tokenizer import Tokenizer
from cftjax.train import checkpoint as checkpoint_lib
from cftjax.train import losses
from cftjax.train import run as run_lib
from cftjax.train import state as state_lib

log = logging.getLogger(__name__)

Batch = dict[str, jax.Array]  # the CFT batch: losses.CFT_BATCH_KEYS, each [batch, seq]


# ------------------------------------------------------------------------------------------------
# The step.


def cft_grad_sums(model_cfg: ModelConfig, params: Any, batch: Batch, *, micro_batches: int,
                  chunk_size: int, z_loss_weight: float = 0.0, compute_dtype=None, frozen: Any = None,
                  rng: jax.Array | None = None) -> tuple[Any, dict[str, jax.Array]]:
  """(summed grads of loss_sum, summed CE statistics) over the global batch, micro-batch by micro-batch.

  Call under jit, inside `parallel.use_mesh`. params: float32 master copies of the trained params
  (cast to compute_dtype, default model_cfg.dtype, inside the differentiated function, so grads come
  back in float32); frozen: a LoRA model's frozen base (None: params are the whole model); rng: for
  the adapters' dropout (None: none). batch: the global CFT batch [B, T]. Divide the results by the
  global token count once to get the mean loss and its gradient.
  """
  losses.check_cft_batch(batch, micro_batches)

  def sums_fn(master_params, micro, micro_rng):
    with parallel.activation_sharding():
      return losses.ce_sums(model_cfg, state_lib.model_params(master_params, frozen), micro,
                            chunk_size=chunk_size, z_loss_weight=z_loss_weight,
                            compute_dtype=compute_dtype, dropout_rng=micro_rng)

  return state_lib.accumulate_gradients(
      sums_fn, params, {key: batch[key] for key in losses.CFT_BATCH_KEYS}, micro_batches=micro_batches,
      grad_shardings=state_lib.grad_shardings(model_cfg), rng=rng, unroll=model_cfg.unroll_loops)


def _mean_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  count = jnp.maximum(sums["token_count"], 1.0)
  return {"loss": sums["loss_sum"] / count, "z_loss": sums["z_loss_sum"] / count,
          "accuracy": sums["correct_sum"] / count, "entropy": sums["entropy_sum"] / count,
          "tokens": sums["token_count"]}


def make_cft_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, *, micro_batches: int = 1,
                  chunk_size: int = 1024, z_loss_weight: float = 0.0, compute_dtype=None,
                  schedule: optax.Schedule | None = None,
                  ) -> Callable[[state_lib.TrainState, Batch], tuple[state_lib.TrainState, dict[str, jax.Array]]]:
  """A jitted `step(state, batch, frozen=None) -> (state, metrics)` on the current mesh
  (`parallel.use_mesh`); the input state is donated. frozen: the frozen base of a LoRA model
  (`ModelConfig.lora_rank` > 0; on `state.frozen_shardings`), whose adapters are state.params.

  batch: the global CFT batch (global jax.Arrays from `parallel.host_local_to_global`, or numpy on
  one process), [B, T] with B a multiple of micro_batches x the batch shards. The loss is the mean
  over all target tokens of the global batch (+ z-loss); k micro-batches give the gradient of one
  full batch. Metrics (float32 scalars): loss, z_loss, accuracy, entropy (means over target tokens),
  tokens, grad_norm (global L2, before the optimizer's clipping), update_skipped (1.0 when a NaN /
  inf loss or gradient made the step skip its update: see `state.apply_update_if_finite`) and lr
  (`schedule(state.step)`, when a schedule is given).
  """
  state_shardings = state_lib.train_state_shardings(model_cfg, tx)

  def step(state: state_lib.TrainState, batch: Batch, frozen: Any
           ) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    grad_sums, sums = cft_grad_sums(
        model_cfg, state.params, batch, micro_batches=micro_batches,
        chunk_size=chunk_size, z_loss_weight=z_loss_weight, compute_dtype=compute_dtype, frozen=frozen,
        rng=state_lib.dropout_rng(model_cfg, state))
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["token_count"], 1.0), grad_sums)
    metrics = _mean_metrics(sums)
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state, update_metrics = state_lib.apply_update_if_finite(state, grads, metrics["loss"], tx)
    return new_state, metrics | update_metrics

  jitted = jax.jit(parallel.bind(step),
                   in_shardings=(state_shardings, parallel.batch_sharding(), state_lib.frozen_shardings(model_cfg)),
                   out_shardings=(state_shardings, parallel.replicated()), donate_argnums=0)
  return state_lib.frozen_optional(jitted)


# ------------------------------------------------------------------------------------------------
# The run.


def training_batches(config: Any, tokenizer: Tokenizer, num_epochs: int | None) -> pipeline.DataIterator:
  """This process's iterator over the training rows (`pipeline.train_sources`) in batches of
  data.batch_size (global), `num_epochs` passes (None: endless)."""
  data = config.data
  return pipeline.make_cft_iterator(
      data, tokenizer, sources=pipeline.train_sources(data), batch_size=data.batch_size,
      num_epochs=num_epochs, num_workers=data.num_workers, process_index=jax.process_index(),
      process_count=jax.process_count())


def count_batches(config: Any, tokenizer: Tokenizer) -> int:
  """Batches in data.num_epochs passes over the training rows, counted by a dry pass (exact with
  packing and drops).

  Each process counts its own shard; all take the smallest count.
  """
  iterator = training_batches(config, tokenizer, config.data.num_epochs)
  count = sum(1 for _ in iterator)
  iterator.close()
  if jax.process_count() > 1:
    count = int(np.min(multihost_utils.process_allgather(np.int64(count))))
  if count == 0:
    raise ValueError(f"the training data yields no batch: check data.train_path and the length "
                     f"policy counts {iterator.length_counts}")
  log.info("%d epoch(s) of training data = %d optimizer steps", config.data.num_epochs, count)
  return count


class CFTRun(run_lib.RunLoop):
  """Everything one CFT `train` call builds; `RunLoop.loop()` runs the steps."""

  def __init__(self, config: Any, extra_evaluator: run_lib.EvaluatorFactory | None):
    self.config = config
    self.run_dir = config.train.run_dir
    run_lib.adopt_init_run_model(config)
    run_lib.check_run_dir(self.run_dir, config)  # config.json is written with the first save
    self.config_record = config_lib.to_plain_dict(config)
    self.model_cfg, self.tokenizer = checkpoint_io.build_model(config.model)
    run_lib.check_attention(self.model_cfg, packed_rows=config.data.packing)
    parallel.check_batch_divisible(config.data.batch_size, config.train.micro_batches, "data.batch_size")
    self.total_steps = config.train.steps or count_batches(config, self.tokenizer)
    self.tx, self.schedule = state_lib.make_optimizer(config.optim, self.total_steps)
    self.checkpoints = checkpoint_lib.RunCheckpoints.from_config(self.run_dir, config.checkpoint)
    # An explicit step count repeats the data as needed; otherwise data.num_epochs bounds it.
    self.data = training_batches(config, self.tokenizer,
                                 None if config.train.steps else config.data.num_epochs)
    self.frozen = run_lib.frozen_base(config, self.model_cfg)
    self.state = run_lib.initial_state(self, self.tx, config.train.seed,
                                       run_lib.model_init_params(config, self.model_cfg))
    self.step = int(jax.device_get(self.state.step))
    self.cft_step = make_cft_step(
        self.model_cfg, self.tx, micro_batches=config.train.micro_batches,
        chunk_size=config.train.chunk_size, z_loss_weight=config.train.z_loss_weight,
        compute_dtype=config.model.dtype, schedule=self.schedule)
    self.evaluator = run_lib.make_evaluator(config, self.model_cfg, self.tokenizer, extra_evaluator)
    self.nonfinite = run_lib.NonFiniteGuard(config.train.max_consecutive_nonfinite)
    self.meter = run_lib.ThroughputMeter(
        run_lib.train_flops_per_token(self.model_cfg, config.data.max_seq_len),
        run_lib.total_peak_flops(config.train.cpu_peak_flops))
    self.writer = run_lib.MetricsWriter(
        self.run_dir, self.total_steps, initial_step=self.step,
        tensorboard=config.logging.tensorboard, progress_bar=config.logging.progress_bar)

  def on_start(self) -> None:
    self.meter.reset()

  def train_step(self, log_now: bool) -> dict[str, float]:
    host_batch = next(self.data)
    self.state, step_metrics = self.cft_step(
        self.state, parallel.host_local_to_global(host_batch), self.frozen)
    self.nonfinite.observe(self.step + 1, float(step_metrics["update_skipped"]))  # waits for the step
    self.meter.add_step(run_lib.count_tokens(host_batch["segment_ids"]) * jax.process_count())
    if not log_now:
      return {}
    metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    metrics |= self.meter.rates() | {"skipped_updates": float(self.nonfinite.total)}
    self.meter.reset()
    return metrics


def train(config: Any, extra_evaluator: run_lib.EvaluatorFactory | None = None) -> dict[str, Any]:
  """Trains (or resumes) the CFT run in config.train.run_dir; returns and writes its summary.

  extra_evaluator: builds evaluations beyond the held-out loss, e.g. verdict accuracy of generated
  critiques (`cftjax.launch` passes `cftjax.eval.heldout.make_verdict_evaluator`).
  The summary holds steps, total_steps, start_step, preempted (stopped by SIGTERM after saving),
  final_train_metrics, initial_eval / final_eval (held-out metrics before and after, when evaluated),
  best_value (of checkpoint.best_metric), data_counts (kept / dropped examples) and wall_time_s.
  """
  return run_lib.run_in_mesh(config, lambda: CFTRun(config, extra_evaluator))
