"""The GRPO / critique-RL training loop: `train(config) -> summary`. Rollouts from the current params,
rewards, advantages, sharded updates, held-out verdict accuracy, metrics and resumable checkpoints."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np
import optax

from cftjax import config as config_lib
from cftjax import parallel
from cftjax.data import pipeline
from cftjax.models import ModelConfig, abstract_params
from cftjax.train import checkpoint as checkpoint_lib
from cftjax.train import cft_trainer
from cftjax.train import grpo_step as grpo_step_lib
from cftjax.train import metrics as metrics_lib
from cftjax.train import optimizer as optimizer_lib
from cftjax.train import run_loop
from cftjax.train import rollout as rollout_lib
from cftjax.train import sft_step as sft_step_lib
from cftjax.train import state as state_lib
from cftjax.train.losses import group_advantages
from cftjax.train.rewards import RewardComputer
from cftjax.train.verdict_eval import HeldOutEvaluator

log = logging.getLogger(__name__)

format_summary = cft_trainer.format_summary  # the same before/after table


# ------------------------------------------------------------------------------------------------
# Config.


def rl_config_section() -> config_dict.ConfigDict:
  """The `rl` section: rollouts, rewards, the GRPO objective and how the policy is initialised."""
  rl = config_dict.ConfigDict()
  # Sampling (cftjax.sampling.generate). Prompts per step = data.batch_size (global).
  rl.group_size = 8  # completions per prompt (G); each prompt's group is its own baseline
  rl.max_new_tokens = 1024  # response length
  rl.temperature = 1.0
  rl.top_p = 1.0  # 1.0 = off
  rl.top_k = 0  # 0 = off
  rl.stop_strings = ()  # besides the tokenizer's end-of-turn ids
  rl.max_prompt_len = 1024  # longer prompts are dropped and counted
  rl.prompt_buckets = ()  # padded prompt lengths (() = powers of two >= 16)
  rl.seq_buckets = ()  # padded update-batch lengths (() = powers of two >= 16)
  rl.generation_batch_size = 0  # rows per generate call (0 = a whole prompt batch x G at once)
  rl.cache_dtype = "float32"  # KV cache dtype: float32 | bfloat16
  # Rewards (cftjax.train.rewards.RewardComputer) and DAPO shaping.
  rl.rewards = config_dict.ConfigDict({
      "by_task": {"crl": "verdict", "math": "math", "code": "code"},
      "scale_by_source": {}, "options": {"verdict": {"style": "auto"}}})
  rl.overlong_buffer = 0  # DAPO soft overlong penalty over the last N tokens (0 = off)
  rl.overlong_penalty = 1.0  # its size at max_new_tokens
  rl.mask_truncated = False  # no loss on completions cut off at max_new_tokens
  rl.dynamic_sampling = False  # DAPO: drop groups with equal rewards, draw more prompts
  rl.max_draws = 3  # prompt batches drawn per step at most (dynamic sampling)
  # Objective (cftjax.train.losses.grpo_loss).
  rl.advantage_scale = "group_std"  # group_std | batch_std | none (Dr. GRPO)
  rl.advantage_eps = 1e-6
  rl.eps_low = 0.2
  rl.eps_high = 0.28  # DAPO clip-higher
  rl.dual_clip = 0.0  # dual-clip constant c > 1 for A < 0 (0 = off)
  rl.aggregation = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
  rl.max_response_len = 0  # Dr. GRPO normaliser (0 = max_new_tokens)
  rl.kl_coef = 0.0  # KL to the frozen initial policy; 0 = no reference model is loaded
  rl.kl_kind = "k3"  # k1 | k3
  rl.ppo_epochs = 1  # optimisation passes over each rollout batch
  rl.mini_batches = 1  # optimizer updates per pass (the batch split by rows)
  rl.recompute_old_logp = False  # old log-probs by a trainer forward pass instead of the sampler's
  # Initial policy: a cftjax run dir (its best params), else model.init_from / from scratch.
  rl.init_from_run = ""
  rl.warmstart_config = ""  # a CFT config trained into init_from_run first unless that run finished
  rl.warmstart_steps = 0  # its train.steps (0 = the config's own)
  return rl


def grpo_config() -> config_dict.ConfigDict:
  """`cftjax.config.base_config()` with train.objective = "grpo" and the `rl` section."""
  c = config_lib.base_config()
  c.train.objective = "grpo"
  c.rl = rl_config_section()
  c.eval.loss_batches = 0  # RL rows carry no critique to score
  return c


def paper_crl_recipe(*, init_from: str, rl_path: str, rl_task: str, rl_template: str, crl_path: str,
                     eval_path: str, max_new_tokens: int, crl_weight: float = 0.2,
                     steps: int = 200) -> config_dict.ConfigDict:
  r"""Critique-Coder's published GRPO settings (arXiv 2509.22824; docs/recipes.md) for a CRL + RL mix.

  8 samples per prompt, 128 prompts per step, lr 1e-6 (constant), clip 0.2 / 0.3, token-mean loss
  over the global batch, no KL (no reference model), std-normalised group advantages, DAPO dynamic
  sampling, T 0.6 / top-p 0.95 / top-k 20. crl_weight of the prompts are CRL rows (verdict reward,
  \conclusion{T|F}); the rest are `rl_task` rows with their verifiable reward. Each prompt's group
  is its own baseline. bf16 compute over float32 master weights, FSDP over every device.
  """
  c = grpo_config()
  c.model.init_from = init_from
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.sources = (
      {"path": rl_path, "task": rl_task, "template": rl_template, "name": rl_task,
       "weight": 1.0 - crl_weight},
      {"path": crl_path, "task": "crl", "template": "crl", "name": "crl", "weight": crl_weight})
  c.data.template = "crl"  # held-out verdict accuracy prompts
  c.data.eval_path = eval_path
  c.data.batch_size = 128
  c.data.max_seq_len = 4096
  c.rl.group_size = 8
  c.rl.max_new_tokens = max_new_tokens
  c.rl.max_prompt_len = 4096
  c.rl.temperature = 0.6
  c.rl.top_p = 0.95
  c.rl.top_k = 20
  c.rl.generation_batch_size = 256
  c.rl.cache_dtype = "bfloat16"
  c.rl.rewards.options.verdict.style = "crl"
  c.rl.eps_low = 0.2
  c.rl.eps_high = 0.3
  c.rl.aggregation = "token_mean"
  c.rl.advantage_scale = "group_std"
  c.rl.kl_coef = 0.0
  c.rl.dynamic_sampling = True
  c.rl.max_draws = 3
  c.optim.lr = 1e-6
  c.optim.schedule = "constant"
  c.optim.warmup_ratio = 0.0
  c.optim.grad_clip_norm = 1.0
  c.train.steps = steps
  c.train.micro_batches = 64  # 1024 rows -> 16 rows per micro-batch
  c.train.chunk_size = 1024  # [1024, ~152k] float32 logits per log-prob chunk
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.checkpoint.every_steps = 10
  c.checkpoint.best_metric = "verdict_accuracy"
  c.eval.every_steps = 20
  c.eval.verdict_examples = 256
  c.eval.batch_size = 64
  c.eval.max_new_tokens = max_new_tokens
  c.eval.verdict_style = "crl"
  c.logging.every_steps = 1
  return c


def rl_data_config(config: Any) -> dict[str, Any]:
  """The RL prompt pipeline config (cftjax.data.pipeline.make_rl_iterator) of the run."""
  data = config.data
  if not data.sources:
    raise config_lib.ConfigError("GRPO needs data.sources: a tuple of source specs with path, task "
                                 "(crl | math | code), weight and template")
  return {"sources": [dict(s) for s in data.sources], "template": data.template,
          "max_seq_len": data.max_seq_len, "max_prompt_len": config.rl.max_prompt_len,
          "batch_size": data.batch_size, "packing": False, "length_policy": "drop",
          "on_bad_row": data.on_bad_row, "seed": data.seed, "num_workers": data.num_workers,
          "num_epochs": None}


def sampling_settings(config: Any, tokenizer: Any) -> rollout_lib.SamplingSettings:
  rl = config.rl
  return rollout_lib.SamplingSettings(
      group_size=rl.group_size, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
      top_k=rl.top_k, top_p=rl.top_p, stop_ids=tuple(tokenizer.eos_ids),
      stop_strings=tuple(rl.stop_strings), prompt_buckets=tuple(rl.prompt_buckets) or None,
      generation_batch_size=rl.generation_batch_size, cache_dtype=rl.cache_dtype,
      pad_id=tokenizer.pad_id or 0)


def policy_loss_config(config: Any) -> grpo_step_lib.PolicyLossConfig:
  rl = config.rl
  return grpo_step_lib.PolicyLossConfig(
      temperature=rl.temperature, eps_low=rl.eps_low, eps_high=rl.eps_high,
      dual_clip=rl.dual_clip or None, aggregation=rl.aggregation,
      max_response_len=rl.max_response_len or rl.max_new_tokens, kl_coef=rl.kl_coef,
      kl_kind=rl.kl_kind)


def _check_config(config: Any, prompts_per_host: int) -> None:
  rl = config.rl
  if config.train.steps < 1:
    raise config_lib.ConfigError("GRPO reads an endless prompt stream: set train.steps (> 0)")
  for key in ("group_size", "max_new_tokens", "ppo_epochs", "mini_batches", "max_draws"):
    if rl[key] < 1:
      raise config_lib.ConfigError(f"rl.{key}={rl[key]} must be >= 1")
  rows = prompts_per_host * rl.group_size
  if rows % rl.mini_batches:
    raise config_lib.ConfigError(
        f"data.batch_size x rl.group_size = {rows} rows per host do not split into "
        f"rl.mini_batches={rl.mini_batches}; change one of them")


# ------------------------------------------------------------------------------------------------
# The initial policy.


def _run_dir_config(run_dir: str) -> config_dict.ConfigDict:
  path = os.path.join(run_dir, config_lib.RUN_CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"rl.init_from_run={run_dir!r} has no {config_lib.RUN_CONFIG_FILE}: "
                            "point it at a directory written by `cftjax train`")
  with open(path) as f:
    return config_dict.ConfigDict(json.load(f)["config"])


def _has_best_params(run_dir: str) -> bool:
  return os.path.isdir(os.path.join(run_dir, checkpoint_lib.BEST_DIR))


def maybe_warmstart(config: Any) -> None:
  """Trains (or finishes training) rl.warmstart_config, a CFT config, into rl.init_from_run unless
  that run has already finished (written its summary)."""
  rl = config.rl
  if not (rl.init_from_run and rl.warmstart_config) or os.path.exists(
      os.path.join(rl.init_from_run, run_loop.SUMMARY_FILE)):
    return
  overrides = [("train.run_dir", rl.init_from_run)]
  if rl.warmstart_steps:
    overrides.append(("train.steps", str(rl.warmstart_steps)))
  if config.data.world_dir:
    overrides.append(("data.world_dir", config.data.world_dir))
    overrides += [(f"data.world.{key}", str(value)) for key, value in config.data.world.items()]
  log.info("rl.init_from_run=%s is not trained yet: training %s there first (%s)", rl.init_from_run,
           rl.warmstart_config, overrides)
  summary = cft_trainer.train(config_lib.load_config(rl.warmstart_config, overrides))
  log.info("warm start done:\n%s", format_summary(summary))


def check_init_run_world(config: Any) -> None:
  """Raises when rl.init_from_run was trained on this run's synthetic world directory as written
  with other data.world settings (e.g. a warm start left over from an older world)."""
  if not (config.rl.init_from_run and config.data.synthetic_world):
    return
  source = _run_dir_config(config.rl.init_from_run).data
  if source.get("world_dir") != config.data.world_dir:
    return
  differing = {key: (source.world.get(key), value) for key, value in config.data.world.items()
               if source.world.get(key) != value}
  if differing:
    raise config_lib.ConfigError(
        f"rl.init_from_run={config.rl.init_from_run!r} was trained on {config.data.world_dir} with "
        f"other data.world settings (it, this run: {differing}): delete that run to train it again "
        "on this world, or point rl.init_from_run elsewhere")


def build_model(config: Any) -> tuple[ModelConfig, Any]:
  """(model config with the run's compute settings, tokenizer); from rl.init_from_run's own
  config when set, else as the CFT trainer builds it (so also for a CFT run's config)."""
  if "rl" not in config or not config.rl.init_from_run:
    return cft_trainer.build_model(config)
  source = _run_dir_config(config.rl.init_from_run)
  if config.model.tokenizer_dir:
    source.model.tokenizer_dir = config.model.tokenizer_dir
  model_cfg, tokenizer = cft_trainer.build_model(source)
  return cft_trainer.with_run_settings(model_cfg, config.model), tokenizer


def initial_params(config: Any, model_cfg: ModelConfig, mesh: Any, rules: Any) -> Any:
  """The initial policy params placed on their shardings, or None for a fresh init from train.seed."""
  shardings = parallel.param_shardings(abstract_params(model_cfg), mesh, rules)
  if config.rl.init_from_run:
    run_dir = config.rl.init_from_run
    if not _has_best_params(run_dir):
      raise FileNotFoundError(f"rl.init_from_run={run_dir!r} has no {checkpoint_lib.BEST_DIR}/ params: "
                              "train it with checkpoint.best_metric set, or set rl.warmstart_config")
    abstract = checkpoint_lib.abstract_with_shardings(state_lib.abstract_master_params(model_cfg),
                                                      shardings)
    step, params = checkpoint_lib.restore_best_params(run_dir, abstract)
    log.info("initial policy: %s best params (step %d)", run_dir, step)
    return params
  if config.model.init_from:
    return checkpoint_lib.load_init_params(config.model.init_from, shardings)
  return None


def reference_params(config: Any, model_cfg: ModelConfig, mesh: Any, rules: Any) -> Any:
  """The frozen initial policy (the KL reference), the same params a fresh run starts from."""
  params = initial_params(config, model_cfg, mesh, rules)
  if params is not None:
    return state_lib.as_float32(params)
  return state_lib.create_train_state(model_cfg, optax.identity(), jax.random.PRNGKey(config.train.seed),
                                      mesh, rules).params


# ------------------------------------------------------------------------------------------------
# The loop.


def _on_any_process(flag: bool) -> bool:
  """Whether `flag` is true on any JAX process (a collective with several processes)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.process_allgather(np.bool_(flag)).any())


def _max_over_processes(value: int) -> int:
  """The largest of every JAX process's `value` (a collective with several processes)."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.process_allgather(np.int64(value)).max())


def _split_rows(batch: dict[str, np.ndarray], parts: int) -> list[dict[str, np.ndarray]]:
  """Host-local batch -> `parts` batches of consecutive rows (the mini-batches)."""
  rows = len(batch["advantages"]) // parts
  return [{k: v[i * rows:(i + 1) * rows] for k, v in batch.items()} for i in range(parts)]


def _mean_over_updates(update_metrics: list[dict[str, float]]) -> dict[str, float]:
  """Means over a step's updates; extremes for ratio_min / ratio_max; the last lr."""
  merged = {}
  for key in update_metrics[0]:
    values = [m[key] for m in update_metrics]
    merged[key] = (min(values) if key == "ratio_min" else max(values) if key == "ratio_max"
                   else values[-1] if key == "lr" else float(np.mean(values)))
  return merged


class _Run(run_loop.RunLoop):
  """Everything one GRPO `train` call builds; `RunLoop.loop()` runs the steps."""

  def __init__(self, config: Any):
    self.config = config
    rl = config.rl
    self.run_dir = config.train.run_dir
    if config.data.synthetic_world:
      cft_trainer.ensure_synthetic_world(config)
    maybe_warmstart(config)
    check_init_run_world(config)
    config_lib.write_run_config(self.run_dir, config, write=jax.process_index() == 0)
    self.config_record = config_lib.to_plain_dict(config)
    self.mesh = parallel.make_mesh(config.mesh)
    self.rules = parallel.LOGICAL_RULES
    self.model_cfg, self.tokenizer = build_model(config)
    cft_trainer.check_attention_backend(self.model_cfg)
    self.prompts_per_host = config.data.batch_size // jax.process_count()
    _check_config(config, self.prompts_per_host)
    self.total_steps = config.train.steps
    self.updates_per_step = rl.ppo_epochs * rl.mini_batches
    self.tx, self.schedule = optimizer_lib.make_optimizer(config.optim,
                                                          self.total_steps * self.updates_per_step)
    self.checkpoints = checkpoint_lib.RunCheckpoints(
        self.run_dir, max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save, best_metric=config.checkpoint.best_metric,
        best_mode=config.checkpoint.best_mode)
    self.data = pipeline.make_rl_iterator(rl_data_config(config), self.tokenizer, jax.process_index(),
                                          jax.process_count())
    self.step = self._init_or_restore_state()
    self.loss_cfg = policy_loss_config(config)
    self.settings = sampling_settings(config, self.tokenizer)
    step_kwargs = dict(chunk_size=config.train.chunk_size, compute_dtype=config.model.dtype)
    self.update = grpo_step_lib.make_grpo_step(
        self.model_cfg, self.tx, self.mesh, self.rules, loss_cfg=self.loss_cfg,
        micro_batches=config.train.micro_batches, schedule=self.schedule, **step_kwargs)
    self.ref_params = None
    if self.loss_cfg.uses_reference:
      self.ref_params = reference_params(config, self.model_cfg, self.mesh, self.rules)
    self.score_log_probs = None
    if self.loss_cfg.uses_reference or rl.recompute_old_logp:
      self.score_log_probs = grpo_step_lib.make_log_prob_fn(
          self.model_cfg, self.mesh, self.rules, temperature=rl.temperature, **step_kwargs)
    self.rewards = RewardComputer(rl.rewards)
    self.nonfinite = cft_trainer.NonFiniteGuard(config.train.max_consecutive_nonfinite)
    self.evaluator = self._make_evaluator()
    self.writer = metrics_lib.MetricsWriter(
        self.run_dir, self.total_steps, initial_step=self.step,
        tensorboard=config.logging.tensorboard, progress_bar=config.logging.progress_bar)

  def _init_or_restore_state(self) -> int:
    """Creates or restores self.state; returns the rollout step it is at."""
    config = self.config
    latest = self.checkpoints.latest_step()
    if latest is None:
      self.state = state_lib.create_train_state(
          self.model_cfg, self.tx, jax.random.PRNGKey(config.train.seed), self.mesh, self.rules,
          initial_params(config, self.model_cfg, self.mesh, self.rules))
      return 0
    abstract = cft_trainer.abstract_train_state(self.model_cfg, self.tx, self.mesh, self.rules,
                                                config.train.seed)
    self.state, data_state = self.checkpoints.restore(latest, abstract)
    self.data.set_state(data_state)
    log.info("resumed %s from step %d", self.run_dir, latest)
    return latest

  def _make_evaluator(self) -> HeldOutEvaluator | None:
    config = self.config
    if not config.data.eval_path or not (config.eval.loss_batches or config.eval.verdict_examples):
      return None
    eval_step = None
    if config.eval.loss_batches:
      eval_step = sft_step_lib.make_eval_step(self.model_cfg, self.mesh, self.rules,
                                              chunk_size=config.train.chunk_size,
                                              compute_dtype=config.model.dtype)
    return HeldOutEvaluator(config, self.model_cfg, self.tokenizer, self.mesh, self.rules, eval_step)

  # -- one step ------------------------------------------------------------------------------------

  def _collect(self) -> rollout_lib.Rollout:
    config, rl = self.config, self.config.rl
    # One key on every process: generation is one global program over all processes' rows.
    step_rng = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), self.step)

    def sample(prompts, draw):
      return rollout_lib.sample_groups(self.state.params, self.model_cfg, prompts, self.settings,
                                       jax.random.fold_in(step_rng, draw), self.tokenizer)

    def score(groups):
      rollout_lib.score_groups(groups, self.rewards, self.tokenizer, max_new_tokens=rl.max_new_tokens,
                               overlong_buffer=rl.overlong_buffer, overlong_factor=rl.overlong_penalty)

    return rollout_lib.collect_rollout(lambda: next(self.data), sample, score,
                                       prompts_per_step=self.prompts_per_host,
                                       dynamic_sampling=rl.dynamic_sampling, max_draws=rl.max_draws,
                                       any_process=_on_any_process)

  def _update_batches(self, rollout: rollout_lib.Rollout) -> list[dict[str, np.ndarray]]:
    """This host's mini-batches; [] when no process has a group to train on. Every process builds
    batches of one shape (the longest row anywhere), with all rows masked where it has no group."""
    rl = self.config.rl
    longest = _max_over_processes(rollout_lib.longest_row(rollout.groups))
    if not longest:
      return []
    advantages = np.zeros(0, np.float32)
    if rollout.groups:
      rewards, group_ids = rollout_lib.group_rewards(rollout.groups)
      advantages = np.asarray(group_advantages(rewards, group_ids=group_ids, scale=rl.advantage_scale,
                                               eps=rl.advantage_eps))
    batch = rollout_lib.build_update_batch(
        rollout.groups, advantages, self.prompts_per_host * rl.group_size,
        seq_buckets=tuple(rl.seq_buckets) or None, mask_truncated=rl.mask_truncated,
        pad_id=self.settings.pad_id, longest=longest)
    return _split_rows(batch, rl.mini_batches)

  def _score_reference_and_old(self, batches: list[dict[str, jax.Array]]) -> float | None:
    """Adds ref_logp / recomputed old_logp to the global batches; returns the recomputed gap."""
    gap_sum, tokens = 0.0, 0.0
    for batch in batches:
      if self.ref_params is not None:
        batch["ref_logp"], _ = self.score_log_probs(self.ref_params, batch)
      if self.config.rl.recompute_old_logp:
        batch["old_logp"], gap = self.score_log_probs(self.state.params, batch)
        gap_sum += float(gap)
        tokens += float(jnp.sum(batch["completion_mask"]))
    return gap_sum / max(tokens, 1.0) if self.config.rl.recompute_old_logp else None

  def train_step(self, log_now: bool) -> dict[str, float]:
    """One rollout + update step; returns its metrics (always gathered: the rollout is on the host)."""
    del log_now
    started = time.perf_counter()
    rollout = self._collect()
    metrics = rollout_lib.rollout_metrics(rollout, self.config.rl.group_size)
    phase_started = time.perf_counter()
    host_batches = self._update_batches(rollout)
    batches = [parallel.host_local_to_global(b, self.mesh, self.rules) for b in host_batches]
    recomputed_gap = self._score_reference_and_old(batches)
    jax.block_until_ready(batches)
    reference_time = time.perf_counter() - phase_started
    phase_started = time.perf_counter()
    update_metrics = []
    for _ in range(self.config.rl.ppo_epochs):
      for batch in batches:
        self.state, step_metrics = self.update(self.state, batch)
        update_metrics.append(step_metrics)
    update_metrics = [{k: float(v) for k, v in m.items()} for m in jax.device_get(update_metrics)]
    for m in update_metrics:
      self.nonfinite.observe(self.step + 1, m["update_skipped"])
    update_time = time.perf_counter() - phase_started
    if update_metrics:
      metrics |= _mean_over_updates(update_metrics)
      metrics["logp_gap"] = (recomputed_gap if recomputed_gap is not None
                             else update_metrics[0]["abs_log_ratio"])
    else:
      log.warning("step %d: no group to train on; the update was skipped", self.step + 1)
    step_time = time.perf_counter() - started
    tokens = sum(int(np.count_nonzero(b["segment_ids"])) for b in host_batches) * jax.process_count()
    generated = sum(int(g.lengths.sum()) for g in rollout.sampled)
    metrics |= {"time_rollout_s": rollout.rollout_time_s, "time_reward_s": rollout.reward_time_s,
                "time_reference_s": reference_time, "time_update_s": update_time,
                "step_time_s": step_time, "tokens_per_s": tokens / step_time,
                "rollout_tokens_per_s": generated / max(rollout.rollout_time_s, 1e-9),
                "reward_errors": float(self.rewards.error_count),
                "skipped_updates": float(self.nonfinite.total)}
    return metrics

  def close(self) -> None:
    self.rewards.close()
    super().close()


def train(config: Any) -> dict[str, Any]:
  """Trains (or resumes) the GRPO run in config.train.run_dir; returns and writes its summary.

  The summary has the CFT trainer's keys (steps, total_steps, start_step, preempted,
  final_train_metrics, initial_eval / final_eval, best_value, data_counts, wall_time_s), so
  `format_summary` prints both.
  """
  parallel.maybe_initialize_distributed()
  return run_loop.run_and_summarize(_Run(config))
