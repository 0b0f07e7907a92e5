"""What the CFT and GRPO trainers share: the held-out evaluation, the non-finite-update guard, the
initial state (restored from the run's newest complete checkpoint or created), model FLOPs and MFU,
the process-0 metrics writer, and `RunLoop`, the step loop with logging, periodic eval, checkpoints
(never of non-finite params), SIGTERM / SIGINT and the run summary (RUN_DIR/summary.json), run under
the run directory's lock."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from cftjax import config as config_lib
from cftjax import parallel
from cftjax.data import pipeline
from cftjax.models import ModelConfig, abstract_params
from cftjax.models import attention, checkpoint_io, lora, peft_io
from cftjax.train import losses
from cftjax.train import checkpoint as checkpoint_lib
from cftjax.train import run_lock
from cftjax.train import state as state_lib

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


# ------------------------------------------------------------------------------------------------
# Held-out evaluation.


class Evaluator(Protocol):
  """Held-out metrics of a set of params, computed at every eval step of a run."""

  def evaluate(self, params: Any) -> dict[str, float]:
    ...


# (config, model_cfg, tokenizer) -> an Evaluator or None: how a caller plugs in evaluations that
# generate (e.g. `cftjax.eval.heldout.VerdictEvaluator`), so the trainers do not import the sampler.
EvaluatorFactory = Callable[[Any, ModelConfig, Any], Evaluator | None]


def make_eval_step(model_cfg: ModelConfig, *, chunk_size: int = 1024,
                   compute_dtype=None) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
  """A jitted `eval(params, batch) -> {loss_sum, token_count, correct_sum}` (float32 sums, no z-loss)
  on a global CFT batch; sum them over eval batches and divide once."""
  param_shardings = parallel.param_shardings(abstract_params(model_cfg))

  def evaluate(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    losses.check_cft_batch(batch, 1)
    with parallel.activation_sharding():
      sums = losses.ce_sums(model_cfg, params, batch, chunk_size=chunk_size, compute_dtype=compute_dtype)
    return {key: sums[key] for key in ("loss_sum", "token_count", "correct_sum")}

  return jax.jit(parallel.bind(evaluate), in_shardings=(param_shardings, parallel.batch_sharding()),
                 out_shardings=parallel.replicated())


class HeldOutLoss:
  """eval_loss and eval_accuracy (next-token) over the first eval.loss_batches held-out batches: the
  rows of data.eval_path rendered like the training rows, eval.batch_size per batch, in-process."""

  def __init__(self, config: Any, model_cfg: ModelConfig, tokenizer: Any):
    parallel.check_batch_divisible(config.eval.batch_size, 1, "eval.batch_size")
    self._config, self._tokenizer = config, tokenizer
    self._eval_step = make_eval_step(model_cfg, chunk_size=config.train.chunk_size,
                                     compute_dtype=config.model.dtype)

  def evaluate(self, params: Any) -> dict[str, float]:
    data = self._config.data
    iterator = pipeline.make_cft_iterator(
        data, self._tokenizer, sources=[pipeline.eval_source(data)],
        batch_size=self._config.eval.batch_size, num_epochs=1, process_index=jax.process_index(),
        process_count=jax.process_count())
    totals = None
    for batch in itertools.islice(iterator, self._config.eval.loss_batches):
      sums = self._eval_step(params, parallel.host_local_to_global(batch))
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    iterator.close()
    if totals is None:
      return {}
    totals = jax.device_get(totals)
    count = max(float(totals["token_count"]), 1.0)
    return {"eval_loss": float(totals["loss_sum"]) / count,
            "eval_accuracy": float(totals["correct_sum"]) / count}


class Evaluators:
  """Several evaluators as one: their metrics merged, in order."""

  def __init__(self, evaluators: list[Evaluator]):
    self._evaluators = evaluators

  def evaluate(self, params: Any) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for evaluator in self._evaluators:
      metrics |= evaluator.evaluate(params)
    return metrics

  def close(self) -> None:
    for evaluator in self._evaluators:
      if hasattr(evaluator, "close"):
        evaluator.close()


def make_evaluator(config: Any, model_cfg: ModelConfig, tokenizer: Any,
                   extra: EvaluatorFactory | None) -> Evaluators | None:
  """The run's held-out evaluation: the held-out loss (eval.loss_batches > 0) and what `extra`
  builds (e.g. verdict accuracy), or None when there is no eval data or nothing to evaluate."""
  if not config.data.eval_path:
    return None
  evaluators: list[Evaluator] = []
  if config.eval.loss_batches:
    evaluators.append(HeldOutLoss(config, model_cfg, tokenizer))
  if extra is not None:
    built = extra(config, model_cfg, tokenizer)
    if built is not None:
      evaluators.append(built)
  return Evaluators(evaluators) if evaluators else None


# ------------------------------------------------------------------------------------------------
# Set-up.


def check_attention(model_cfg: ModelConfig, packed_rows: bool) -> None:
  """Raises a ConfigError naming model.attention (or data.packing) when the attention backend cannot
  run on the run's devices (`parallel.platform`), or cannot take rows packed with several sequences."""
  attention.check_backend(model_cfg.attention, parallel.platform(), packed_rows)


def check_run_dir(run_dir: str, config: Any) -> None:
  """Raises a ConfigError when `config` cannot resume the state saved in `run_dir`. Only a run that
  saved something (a train-state step or best params) is checked: the config.json of a start that
  failed before its first save does not bind the next command."""
  steps, best = checkpoint_io.run_steps(run_dir)
  if steps or best is not None:
    config_lib.check_run_config(run_dir, config)


def initial_state(run: "RunLoop", tx: optax.GradientTransformation, seed: int,
                  init_params: Callable[[Any], Any]) -> state_lib.TrainState:
  """The run's newest complete checkpoint (its data position restored into run.data) if there is
  one, else a fresh state whose trained params are `init_params(their shardings)` (None:
  initialised from `seed`). A damaged newest step is moved to RUN_DIR/corrupt_checkpoints with a one-line warning and
  the step before it is restored; with none before it the error is raised."""
  steps = run.checkpoints.complete_steps()
  if steps:
    abstract = state_lib.abstract_train_state(run.model_cfg, tx, seed)
    for i, step in enumerate(steps):
      try:
        state, data_state = run.checkpoints.restore(step, abstract)
      except checkpoint_lib.CheckpointDamagedError as e:
        if i + 1 == len(steps):
          step_dir = os.path.join(run.run_dir, checkpoint_io.RUN_CHECKPOINT_DIR, str(step))
          raise checkpoint_lib.CheckpointDamagedError(
              f"{e}; there is no earlier complete checkpoint to fall back to: move {step_dir} aside to "
              "train this run from step 0") from None
        moved = run.checkpoints.move_aside(step)
        log.warning("%s; moved it to %s and resuming from step %d, the previous complete checkpoint",
                    e, moved, steps[i + 1])
        continue
      run.data.set_state(data_state)
      log.info("resumed %s from step %d", run.run_dir, step)
      return state
  shardings = state_lib.train_state_shardings(run.model_cfg, tx)
  return state_lib.create_train_state(run.model_cfg, tx, jax.random.PRNGKey(seed),
                                      init_params(shardings.params), run.frozen)


def init_run_dir(config: Any) -> str:
  """The run directory of model.init_from_run (which may carry a checkpoint selector, e.g.
  RUN_DIR:latest)."""
  return checkpoint_io.parse_checkpoint_ref(config.model.init_from_run).path


def adopt_init_run_model(config: Any) -> None:
  """With model.init_from_run, sets config.model's init_from, tokenizer_dir, param_dtype and arch to
  that run's, so this run's config.json describes the model it trains (and `load_run` rebuilds it)."""
  if not config.model.init_from_run:
    return
  source = checkpoint_io.read_run_config(init_run_dir(config)).model
  model = config.model
  model.init_from = source.init_from
  model.tokenizer_dir = model.tokenizer_dir or source.tokenizer_dir
  model.param_dtype = source.param_dtype
  for key in model.arch.keys():
    model.arch[key] = source.arch[key]


def model_init_params(config: Any, model_cfg: ModelConfig) -> Callable[[Any], Any]:
  """`init_params` for `initial_state`. A full fine-tune: the params model.init_from_run selects (a
  checkpoint selector: RUN_DIR is its best if that beats step 0, else its latest), else the converted
  checkpoint in model.init_from, else None (a fresh init). With LoRA (model.lora.rank > 0; the base
  is `frozen_base`): the adapters of the PEFT directory in model.lora.init_from, else None (fresh
  adapters)."""
  def load(shardings: Any) -> Any:
    if model_cfg.lora_rank:
      if not config.model.lora.init_from:
        return None
      return peft_io.load_adapters(config.model.lora.init_from, model_cfg, shardings)
    if config.model.init_from_run:
      target = checkpoint_io.params_target(model_cfg, shardings, dtype="float32")
      step, params = checkpoint_io.load_run_params(config.model.init_from_run, target)
      log.info("initial params: %s, step %d", config.model.init_from_run, step)
      return params
    if not config.model.init_from:
      return None
    return checkpoint_io.load_init_params(config.model.init_from, shardings)

  return load


def frozen_base(config: Any, model_cfg: ModelConfig) -> Any:
  """A LoRA run's frozen base on its shardings (`state.frozen_shardings`): `checkpoint_io.
  lora_base_params` in model_cfg.param_dtype, its targeted kernels quantized with
  model.lora.quantize_base (int8, nf4, int4). None when the run trains the whole model."""
  if not model_cfg.lora_rank:
    return None
  base_cfg = model_cfg.without_lora()
  params = checkpoint_io.lora_base_params(config, base_cfg, parallel.param_shardings(abstract_params(base_cfg)))
  prepare = lambda p: lora.quantize_base(model_cfg, state_lib.cast_floats(p, model_cfg.param_dtype))
  frozen = jax.jit(prepare, out_shardings=state_lib.frozen_shardings(model_cfg))(params)
  log.info("LoRA rank %d on %s: %d trained params; frozen base (%s) kept outside the optimizer",
           model_cfg.lora_rank, ",".join(model_cfg.lora_targets),
           sum(x.size for x in jax.tree.leaves(state_lib.abstract_master_params(model_cfg))),
           model_cfg.quantize_base if model_cfg.quantize_base != "none" else model_cfg.param_dtype)
  return frozen


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


def format_summary(summary: dict[str, Any]) -> str:
  """A before/after table of the held-out metrics and a line about the run."""
  lines = [f"run {summary['run_dir']}: steps {summary['start_step']} -> {summary['steps']} of "
           f"{summary['total_steps']} in {summary['wall_time_s']:.1f} s"
           + (f" (stopped by {summary.get('signal') or 'preemption'}: checkpoint saved; rerun to resume)"
              if summary["preempted"] else "")
           + (f"; {summary['skipped_updates']} update(s) skipped" if summary.get("skipped_updates") else "")]
  if summary.get("best_step") is not None:
    lines.append(f"best params: step {summary['best_step']} ({summary['run_dir']}:best)")
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


# ------------------------------------------------------------------------------------------------
# Metrics.

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


def json_safe(value: Any) -> Any:
  """`value` with every NaN / inf float replaced by None (JSON null), so the file stays valid JSON."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


class MetricsWriter:
  """Writes metrics on process 0 only (JSONL, TensorBoard, tqdm); a no-op elsewhere.

  Each record is `{"step": int, "split": "train" | "eval", **scalars}`; a NaN / inf scalar is
  written as null. Appends to an existing
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
    self._jsonl.write(json.dumps(json_safe({"step": int(step), "split": split, **values}),
                                 allow_nan=False) + "\n")
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


# ------------------------------------------------------------------------------------------------
# The step loop.


def _due(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


_all_finite = jax.jit(lambda tree: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])))


def params_finite(params: Any) -> bool:
  """Whether every param is finite (a collective over the params' shardings: call on all processes)."""
  return bool(_all_finite(params))


def read_summary(run_dir: str) -> dict[str, Any]:
  """RUN_DIR/summary.json as written by the last `train` call that ended, or {} (none, unreadable)."""
  try:
    with open(os.path.join(run_dir, SUMMARY_FILE), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def finished_summary(run_dir: str) -> dict[str, Any] | None:
  """The summary of a run that has finished (trained its last step and ran its final eval), else None."""
  summary = read_summary(run_dir)
  return summary if summary.get("finished") else None


class RunLoop:
  """Base of a trainer's run, built and run inside `parallel.use_mesh`. A subclass's __init__ sets
  config, run_dir, model_cfg, step, total_steps, state, data, writer, checkpoints, evaluator (or None),
  nonfinite (a NonFiniteGuard) and config_record, and implements `train_step`."""

  config: Any
  run_dir: str
  model_cfg: ModelConfig
  step: int
  total_steps: int
  _config_committed: bool = False
  frozen: Any = None  # a LoRA run's frozen base (`frozen_base`); state.params are then its adapters

  def train_step(self, log_now: bool) -> dict[str, float]:
    """Advances one optimizer step (raises StopIteration when the data ends); returns the metrics to log
    when `log_now` (the subclass may skip gathering them otherwise)."""
    raise NotImplementedError

  def on_start(self) -> None:
    """Called once before the first step, after the initial evaluation."""

  def skipped_updates(self) -> int:
    """Updates skipped in this call so far (NaN / inf loss or gradient)."""
    return self.nonfinite.total

  def commit_config(self) -> None:
    """Writes RUN_DIR/config.json (process 0) before the first thing this call saves, so the config
    is on disk exactly when there is saved training state it describes."""
    if not self._config_committed:
      config_lib.write_run_config(self.run_dir, self.config, write=jax.process_index() == 0)
      self._config_committed = True

  def _unsafe_to_save(self) -> str | None:
    """Why the params must not be saved now (None when they may): the last update was skipped for a
    NaN / inf (saving would rotate out the checkpoints from before the trouble) or a param is NaN / inf."""
    if self.nonfinite.consecutive:
      return f"the last {self.nonfinite.consecutive} update(s) were skipped for NaN/inf"
    if not params_finite(self.state.params):
      return "the params hold NaN/inf"
    return None
  def model_params(self) -> Any:
    """The whole model's params now: the trained params, with the frozen base of a LoRA run."""
    return state_lib.model_params(self.state.params, self.frozen)

  def evaluate(self) -> dict[str, float]:
    metrics = self.evaluator.evaluate(self.model_params())
    self.writer.write(self.step, metrics, split="eval")
    if self.checkpoints.is_improvement(metrics) and self._unsafe_to_save() is None:
      self.commit_config()
      self.checkpoints.maybe_save_best(self.step, self.state.params, metrics)
    return metrics

  def save(self) -> None:
    """Saves the train state of this step unless `_unsafe_to_save` (then the earlier steps stay)."""
    reason = self._unsafe_to_save()
    if reason:
      log.warning("step %d: no checkpoint saved because %s; the checkpoints of steps %s are kept",
                  self.step, reason, sorted(self.checkpoints.complete_steps()))
      return
    self.commit_config()
    self.checkpoints.save(self.step, self.state, self.data.get_state(), self.config_record)

  def loop(self, stop: checkpoint_lib.PreemptionFlag) -> dict[str, Any]:
    """Runs the steps left, the periodic and final evals and saves; returns the run summary.

    `stop` (entered by the caller) ends the loop after a step with a save when SIGTERM / SIGINT
    arrives. The final eval runs once per finished run: a rerun that finds the run at its last
    step runs it when the earlier call did not (it was stopped before it), else reuses its result.
    """
    config = self.config
    start_step, started = self.step, time.perf_counter()
    prior = read_summary(self.run_dir) if start_step else {}
    summary: dict[str, Any] = {"run_dir": self.run_dir, "start_step": start_step,
                               "total_steps": self.total_steps, "preempted": False}
    if "initial_eval" in prior:
      summary["initial_eval"] = prior["initial_eval"]
    if self.evaluator is not None and config.eval.at_start and self.step == 0:
      summary["initial_eval"] = self.evaluate()
    last_metrics: dict[str, float] = {}
    self.on_start()
    while self.step < self.total_steps:
      final = self.step + 1 == self.total_steps
      log_now = _due(self.step + 1, config.logging.every_steps) or final
      try:
        metrics = self.train_step(log_now)
      except StopIteration:
        log.warning("training data ended at step %d of %d", self.step, self.total_steps)
        break
      self.step += 1
      self.writer.advance(self.step)
      if log_now:
        last_metrics = metrics
        self.writer.write(self.step, metrics)
      if self.evaluator is not None and _due(self.step, config.eval.every_steps) and not final:
        self.evaluate()
      summary["preempted"] = stop.should_stop(self.step)
      if _due(self.step, config.checkpoint.every_steps) or summary["preempted"]:
        self.save()
      if summary["preempted"]:
        break
    if not summary["preempted"]:
      self.save()  # the final state (a no-op when this step was just saved)
      summary["preempted"] = stop.signalled()  # a signal after the last step: the rerun evaluates
      if self.evaluator is not None and not summary["preempted"]:
        if self.step == start_step and prior.get("steps") == self.step and "final_eval" in prior:
          summary["final_eval"] = prior["final_eval"]
        else:
          summary["final_eval"] = self.evaluate()
    self.checkpoints.wait()
    summary.update(steps=self.step, finished=not summary["preempted"], signal=stop.received,
                   final_train_metrics=last_metrics, wall_time_s=time.perf_counter() - started,
                   data_counts=self.data.length_counts, skipped_updates=self.skipped_updates(),
                   best_step=self.checkpoints.best_step(), best_value=self.checkpoints.best_value())
    return summary

  def close(self) -> None:
    if self.evaluator is not None:
      self.evaluator.close()
    self.writer.close()
    self.checkpoints.close()
    self.data.close()


@contextlib.contextmanager
def locked_run_dir(run_dir: str):
  """Holds RUN_DIR's lock (process 0 takes it; every process raises RunLockedError when it is held)."""
  lock = run_lock.RunLock(run_dir) if jax.process_index() == 0 else None
  error = None
  if lock is not None:
    try:
      lock.acquire()
    except run_lock.RunLockedError as e:
      error = e
  refused = error is not None
  if jax.process_count() > 1:
    refused = bool(multihost_utils.process_allgather(np.bool_(refused)).any())
  if refused:
    raise error or run_lock.RunLockedError(f"{run_dir}: process 0 found the run directory locked")
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def run_in_mesh(config: Any, build: Callable[[], RunLoop]) -> dict[str, Any]:
  """Under RUN_DIR's lock, builds a run and runs its loop inside `parallel.use_mesh` on the mesh of
  config.mesh (sizes and rules) with SIGTERM / SIGINT turned into a save and a stop, writes the
  summary (process 0; also when a signal comes after the last step), closes the run; returns the
  summary."""
  parallel.maybe_initialize_distributed()
  mesh = parallel.make_mesh(config.mesh)
  with locked_run_dir(config.train.run_dir), parallel.use_mesh(mesh, parallel.logical_rules(config.mesh.rules)):
    run = build()
    try:
      with checkpoint_lib.PreemptionFlag(run.checkpoints) as stop:
        summary = run.loop(stop)
        if jax.process_index() == 0:
          with open(os.path.join(run.run_dir, SUMMARY_FILE), "w") as f:
            json.dump(json_safe(summary), f, indent=2, allow_nan=False, default=float)
    finally:
      run.close()
  return summary
