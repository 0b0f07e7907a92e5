"""Critique RL and GRPO end to end: the jitted, sharded GRPO update (clipped surrogate + optional KL,
micro-batch accumulation, one division by the GLOBAL loss normaliser), the log-prob scorer, and the
training run `train(config) -> summary` (rollouts from the current params, rewards, group
advantages, updates, held-out evaluation, metrics and resumable checkpoints)."""

from __future__ import annotations

from collections.abc import Callable
import logging
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
import numpy as np
import optax

from cftjax import config as config_lib
from cftjax import parallel, sampling
from cftjax.data import pipeline
from cftjax.models import ModelConfig, abstract_params
from cftjax.models import checkpoint_io, lora
from cftjax.rewards.registry import RewardComputer
from cftjax.train import checkpoint as checkpoint_lib
from cftjax.train import losses
from cftjax.train import refinement as refinement_lib
from cftjax.train import rollout as rollout_lib
from cftjax.train import run as run_lib
from cftjax.train import state as state_lib

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# The update step.

# The GRPO update batch (see cftjax.train.rollout.build_update_batch); all [B, T]: inputs, targets
# (int32), positions, segment_ids (int32, 0 = padding), completion_mask (float32, 1 on generated
# target tokens), old_logp (float32, aligned to targets), advantages, token_weights and refined_mask
# (float32, per token; refined_mask 1 on off-policy refinement tokens), ref_logp (float32) when the KL
# term is on and sampler_logp (the sampler's, when old_logp is recomputed) for truncated IS.
Batch = dict[str, jax.Array]
SCORE_KEYS = ("inputs", "targets", "positions", "segment_ids", "completion_mask")
UPDATE_KEYS = SCORE_KEYS + ("old_logp", "advantages", "token_weights", "refined_mask")
# rl.loss -> (policy loss, advantage scale, aggregation); None = the rl section's own key.
LOSS_PRESETS = {"grpo": ("grpo", None, None), "dr_grpo": ("grpo", "none", "seq_mean_token_sum_norm"),
                "gspo": ("gspo", None, None), "gspo_token": ("gspo_token", None, None),
                "cispo": ("cispo", None, None)}
LOG_RATIO_CLAMP = 20.0  # bound on |logp - old_logp| inside the ratio (losses.grpo_loss)


def objective(rl: Any) -> tuple[str, str, str]:
  """(policy loss, advantage scale, aggregation) of rl.loss: dr_grpo (arXiv 2503.20783) is the grpo
  surrogate with centred advantages (no std) and the constant normaliser seq_mean_token_sum_norm;
  the other losses take rl.advantage_scale and rl.aggregation."""
  loss_type, scale, aggregation = LOSS_PRESETS[rl.loss]
  return loss_type, scale or rl.advantage_scale, aggregation or rl.aggregation


def check_loss_settings(rl: Any) -> None:
  """Raises a ConfigError naming the `rl` key of the GRPO objective that cannot be used."""
  if rl.loss not in LOSS_PRESETS:
    raise config_lib.ConfigError(f"rl.loss={rl.loss!r} is not one of {tuple(LOSS_PRESETS)}")
  if rl.dual_clip and LOSS_PRESETS[rl.loss][0] != "grpo":
    raise config_lib.ConfigError(f"rl.dual_clip={rl.dual_clip} applies to the grpo / dr_grpo "
                                 f"surrogate, not rl.loss={rl.loss!r}; set it to 0")
  if rl.tis_cap < 0 or (rl.tis_cap and not rl.recompute_old_logp):
    raise config_lib.ConfigError(f"rl.tis_cap={rl.tis_cap}: truncated importance sampling weighs the "
                                 "trainer's old log-probs against the sampler's; it needs "
                                 "rl.recompute_old_logp=True and a cap > 0 (0 = off)")
  if rl.advantage_scale not in losses.ADVANTAGE_SCALES:
    raise config_lib.ConfigError(f"rl.advantage_scale={rl.advantage_scale!r} is not one of "
                                 f"{losses.ADVANTAGE_SCALES}")
  refinement_lib.check_settings(rl)
  if rl.aggregation not in losses.AGGREGATION_MODES:
    raise config_lib.ConfigError(f"rl.aggregation={rl.aggregation!r} is not one of "
                                 f"{losses.AGGREGATION_MODES}")
  if rl.kl_kind not in losses.KL_KINDS:
    raise config_lib.ConfigError(f"rl.kl_kind={rl.kl_kind!r} is not one of {losses.KL_KINDS}")
  if rl.kl_coef < 0:
    raise config_lib.ConfigError(f"rl.kl_coef={rl.kl_coef} must be >= 0 (0 turns the reference "
                                 "model off)")
  if rl.temperature <= 0:
    raise config_lib.ConfigError(f"rl.temperature={rl.temperature}: log-probs need a positive "
                                 "temperature")


def uses_reference(rl: Any) -> bool:
  """Whether the objective has a KL term to the frozen initial policy (rl.kl_coef > 0)."""
  return rl.kl_coef > 0


def batch_keys(rl: Any) -> tuple[str, ...]:
  """The keys of the update batch the objective of `rl` reads."""
  return (UPDATE_KEYS + (("ref_logp",) if uses_reference(rl) else ())
          + (("sampler_logp",) if rl.tis_cap else ()))


def _select_keys(jitted: Callable, keys: tuple[str, ...], what: str) -> Callable:
  """`jitted(first, batch, *rest)` called with exactly `keys` of batch (other keys ignored; missing
  raise); its `.lower(first, batch, *rest)` lowers the same program (`cftjax.aot`)."""
  def call(first: Any, batch: Batch, *rest):
    missing = [key for key in keys if key not in batch]
    if missing:
      raise ValueError(f"{what} batch is missing {missing}; it needs {list(keys)} "
                       "(build it with cftjax.train.rollout.build_update_batch)")
    return jitted(first, {key: batch[key] for key in keys}, *rest)

  call.lower = lambda first, batch, *rest: jitted.lower(first, {key: batch[key] for key in keys}, *rest)
  return call


def grpo_sums(model_cfg: ModelConfig, params: Any, batch: Batch, rl: Any, *, chunk_size: int,
              compute_dtype=None, dropout_rng: jax.Array | None = None) -> dict[str, jax.Array]:
  """`grpo_loss` sums of one (micro-)batch under the `rl` section's objective (`objective(rl)`), plus
  entropy_sum (masked) and seq_count. Log-probs are of softmax(logits / rl.temperature); rl.dual_clip
  0 is off; rl.max_response_len 0 is rl.max_new_tokens. Token weights: batch["token_weights"] times,
  with rl.tis_cap, min(exp(old_logp - sampler_logp), rl.tis_cap) on on-policy tokens. params: the
  whole model's; dropout_rng: for LoRA dropout (None: none)."""
  logp, entropy = losses.completion_log_probs(model_cfg, params, batch, chunk_size=chunk_size,
                                              temperature=rl.temperature, compute_dtype=compute_dtype,
                                              dropout_rng=dropout_rng)
  mask = batch["completion_mask"].astype(jnp.float32)
  refined = batch["refined_mask"]
  weights = batch["token_weights"]
  if rl.tis_cap:
    tis = losses.truncated_is_weights(batch["old_logp"], batch["sampler_logp"], rl.tis_cap)
    weights = weights * jnp.where(refined > 0, 1.0, tis)
  loss_type, _, aggregation = objective(rl)
  sums = losses.grpo_loss(logp, batch["old_logp"], batch["advantages"], mask,
                          ref_logp=batch.get("ref_logp"), kl_coef=rl.kl_coef, kl_kind=rl.kl_kind,
                          eps_low=rl.eps_low, eps_high=rl.eps_high, dual_clip=rl.dual_clip or None,
                          log_ratio_clamp=LOG_RATIO_CLAMP, aggregation=aggregation,
                          max_response_len=rl.max_response_len or rl.max_new_tokens,
                          refined_mask=refined, shaping_gamma=rl.refinement.shaping_gamma,
                          loss_type=loss_type, token_weights=weights,
                          entropy=entropy if rl.entropy_coef else None, entropy_coef=rl.entropy_coef)
  return sums | {"entropy_sum": jnp.sum(mask * jax.lax.stop_gradient(entropy)),
                 "refined_token_sum": jnp.sum(mask * refined),
                 "seq_count": jnp.sum(jnp.sum(mask, axis=1) > 0).astype(jnp.float32)}


def _mean_metrics(sums: dict[str, jax.Array], uses_reference: bool) -> dict[str, jax.Array]:
  tokens = jnp.maximum(sums["token_count"], 1.0)
  denominator = jnp.maximum(sums["denominator"], 1e-9)
  metrics = {
      "loss": sums["loss_sum"] / denominator, "pg_loss": sums["pg_loss_sum"] / denominator,
      "entropy": sums["entropy_sum"] / tokens, "clip_frac_low": sums["clip_low_sum"] / tokens,
      "clip_frac_high": sums["clip_high_sum"] / tokens, "dual_clip_frac": sums["dual_clip_sum"] / tokens,
      "ratio_mean": sums["ratio_sum"] / tokens, "ratio_min": sums["ratio_min"],
      "ratio_max": sums["ratio_max"], "abs_log_ratio": sums["abs_log_ratio_sum"] / tokens,
      "completion_tokens": sums["token_count"], "sequences": sums["seq_count"],
      "token_weight_mean": sums["weight_sum"] / tokens, "entropy_loss": sums["entropy_loss_sum"] / denominator,
      "refined_token_fraction": sums["refined_token_sum"] / tokens}
  if uses_reference:
    metrics |= {"kl": sums["kl_sum"] / tokens, "kl_loss": sums["kl_loss_sum"] / denominator}
  return metrics


def _batch_shardings(keys: tuple[str, ...]) -> dict[str, NamedSharding]:
  return {key: parallel.batch_sharding(2) for key in keys}


def make_grpo_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, *, rl: Any,
                   micro_batches: int = 1, chunk_size: int = 1024,
                   compute_dtype=None, schedule: optax.Schedule | None = None,
                   ) -> Callable[[state_lib.TrainState, Batch], tuple[state_lib.TrainState, dict[str, jax.Array]]]:
  """A jitted `step(state, batch, frozen=None) -> (state, metrics)`: one optimizer update; the state
  is donated. frozen: the frozen base of a LoRA model (its adapters are state.params), else None.

  rl: the config's `rl` section (the objective: loss, temperature, eps_low / eps_high, dual_clip,
  aggregation, max_response_len, kl_coef, kl_kind, entropy_coef, tis_cap, refinement.shaping_gamma;
  see `grpo_sums`), checked here.
  batch: the global update batch (`batch_keys(rl)`; global jax.Arrays from
  `parallel.host_local_to_global`, or numpy on one process), B a multiple of micro_batches x the
  batch shards. The loss is sum(numerators) / sum(denominators) over the WHOLE batch, so k
  micro-batches give the gradient of one full batch. Metrics (float32 scalars): loss, pg_loss,
  entropy, entropy_loss, clip_frac_low / high, dual_clip_frac, ratio_mean / min / max, abs_log_ratio
  (mean |logp - old_logp|), kl and kl_loss (with a reference), token_weight_mean,
  refined_token_fraction, completion_tokens, sequences, grad_norm
  (before the optimizer's clipping), update_skipped (1.0 when a NaN / inf loss or gradient made the
  step skip its update: see `state.apply_update_if_finite`) and lr (when a schedule is given).
  """
  state_shardings = state_lib.train_state_shardings(model_cfg, tx)
  check_loss_settings(rl)
  keys = batch_keys(rl)

  def step(state: state_lib.TrainState, batch: Batch, frozen: Any
           ) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    parallel.check_batch_divisible(batch["inputs"].shape[0], micro_batches, "GRPO update")

    def sums_fn(master_params, micro, micro_rng):
      with parallel.activation_sharding():
        return grpo_sums(model_cfg, state_lib.model_params(master_params, frozen), micro, rl,
                         chunk_size=chunk_size, compute_dtype=compute_dtype, dropout_rng=micro_rng)

    grad_sums, sums = state_lib.accumulate_gradients(
        sums_fn, state.params, batch, micro_batches=micro_batches,
        grad_shardings=state_lib.grad_shardings(model_cfg), rng=state_lib.dropout_rng(model_cfg, state),
        unroll=model_cfg.unroll_loops)
    denominator = sums["denominator"]
    grads = jax.tree.map(lambda g: jnp.where(denominator > 0, g / jnp.maximum(denominator, 1e-9), 0.0),
                         grad_sums)
    metrics = _mean_metrics(sums, uses_reference(rl))
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state, update_metrics = state_lib.apply_update_if_finite(state, grads, metrics["loss"], tx)
    return new_state, metrics | update_metrics

  in_shardings = (state_shardings, _batch_shardings(keys), state_lib.frozen_shardings(model_cfg))
  update = _select_keys(jax.jit(parallel.bind(step), in_shardings=in_shardings,
                                out_shardings=(state_shardings, parallel.replicated()), donate_argnums=0),
                        keys, "GRPO update")
  return state_lib.frozen_optional(update)


def make_log_prob_fn(model_cfg: ModelConfig, *, chunk_size: int = 1024,
                     compute_dtype=None, temperature: float = 1.0
                     ) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
  """A jitted `score(params, batch) -> (logp [B, T], abs_gap_sum [])` for the policy or reference.

  logp: float32 log-probs of the targets at `temperature`, zero off the completion mask (the old or
  reference log-probs of an update batch). abs_gap_sum: sum over completion tokens of
  |logp - batch["old_logp"]| (the sampler-vs-trainer gap when old_logp holds the sampler's).
  """
  param_shardings = parallel.param_shardings(abstract_params(model_cfg))
  keys = SCORE_KEYS + ("old_logp",)

  def score(params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    with parallel.activation_sharding():
      logp, _ = losses.completion_log_probs(model_cfg, params, batch, chunk_size=chunk_size,
                                            temperature=temperature, compute_dtype=compute_dtype)
    mask = batch["completion_mask"] > 0
    logp = jnp.where(mask, logp, 0.0)
    return logp, jnp.sum(jnp.where(mask, jnp.abs(logp - batch["old_logp"]), 0.0))

  return _select_keys(jax.jit(parallel.bind(score), in_shardings=(param_shardings, _batch_shardings(keys)),
                              out_shardings=(parallel.batch_sharding(), parallel.replicated())),
                      keys, "log-prob scoring")

# ------------------------------------------------------------------------------------------------
# The run: settings from config.rl.


def prompt_batches(config: Any, tokenizer: Any) -> pipeline.DataIterator:
  """This process's endless iterator over prompt batches of data.sources (data.batch_size global)."""
  data = config.data
  if not data.sources:
    raise config_lib.ConfigError("GRPO needs data.sources: a tuple of source specs with path, task "
                                 "(crl | math | code), weight and template")
  return pipeline.make_rl_iterator(
      data, tokenizer, sources=data.sources, batch_size=data.batch_size, num_epochs=None,
      max_prompt_len=config.rl.max_prompt_len, num_workers=data.num_workers,
      process_index=jax.process_index(), process_count=jax.process_count())


def _check_config(config: Any, prompts_per_host: int) -> None:
  rl = config.rl
  if config.train.steps < 1:
    raise config_lib.ConfigError("GRPO reads an endless prompt stream: set train.steps (> 0)")
  for key in ("group_size", "max_new_tokens", "ppo_epochs", "mini_batches", "max_draws"):
    if rl[key] < 1:
      raise config_lib.ConfigError(f"rl.{key}={rl[key]} must be >= 1")
  if rl.group_size == 1:
    raise config_lib.ConfigError(
        "rl.group_size=1: a GRPO advantage is a reward minus its group's mean, so a group of one "
        "always has advantage 0 and nothing would train; set rl.group_size >= 2 (e.g. 8)")
  check_loss_settings(rl)
  rows = prompts_per_host * refinement_lib.rows_per_group(rl)
  if rows % rl.mini_batches:
    raise config_lib.ConfigError(
        f"data.batch_size x (rl.group_size + refinements) = {rows} rows per host do not split into "
        f"rl.mini_batches={rl.mini_batches}; change one of them")

# ------------------------------------------------------------------------------------------------
# The KL reference.


def reference_params(config: Any, model_cfg: ModelConfig) -> Any:
  """The frozen initial policy (the KL reference) of a full fine-tune, the same params a fresh run
  starts from (a LoRA run needs none: `GRPORun.reference_model_params`)."""
  shardings = parallel.param_shardings(abstract_params(model_cfg))
  params = run_lib.model_init_params(config, model_cfg)(shardings)
  if params is not None:
    return state_lib.as_float32(params)
  return state_lib.create_train_state(model_cfg, optax.identity(),
                                      jax.random.PRNGKey(config.train.seed)).params


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


class GRPORun(run_lib.RunLoop):
  """Everything one GRPO `train` call builds; `RunLoop.loop()` runs the steps."""

  def __init__(self, config: Any, extra_evaluator: run_lib.EvaluatorFactory | None):
    self.config = config
    rl = config.rl
    self.run_dir = config.train.run_dir
    run_lib.adopt_init_run_model(config)
    run_lib.check_run_dir(self.run_dir, config)  # config.json is written with the first save
    self.config_record = config_lib.to_plain_dict(config)
    self.model_cfg, self.tokenizer = checkpoint_io.build_model(config.model)
    run_lib.check_attention(self.model_cfg, packed_rows=False)  # update rows: one sequence each
    self.prompts_per_host = config.data.batch_size // jax.process_count()
    _check_config(config, self.prompts_per_host)
    self.total_steps = config.train.steps
    self.updates_per_step = rl.ppo_epochs * rl.mini_batches
    self.tx, self.schedule = state_lib.make_optimizer(config.optim, self.total_steps * self.updates_per_step)
    self.checkpoints = checkpoint_lib.RunCheckpoints.from_config(self.run_dir, config.checkpoint)
    self.data = prompt_batches(config, self.tokenizer)
    self.frozen = run_lib.frozen_base(config, self.model_cfg)
    self.state = run_lib.initial_state(self, self.tx, config.train.seed,
                                       run_lib.model_init_params(config, self.model_cfg))
    self.step = self.checkpoints.latest_step() or 0  # rollout steps (state.step counts updates)
    step_kwargs = dict(chunk_size=config.train.chunk_size, compute_dtype=config.model.dtype)
    self.update = make_grpo_step(
        self.model_cfg, self.tx, rl=rl,
        micro_batches=config.train.micro_batches, schedule=self.schedule, **step_kwargs)
    self.ref_params = None  # a full fine-tune's KL reference; a LoRA run's is its base
    if uses_reference(rl) and self.frozen is None:
      self.ref_params = reference_params(config, self.model_cfg)
    self.score_log_probs = None
    if uses_reference(rl) or rl.recompute_old_logp:
      self.score_log_probs = make_log_prob_fn(
          self.model_cfg, temperature=rl.temperature, **step_kwargs)
    self.rewards = RewardComputer(rl.rewards, code=rl.code)
    self.refiner = self._make_refiner() if refinement_lib.enabled(rl) else None
    if rl.loss == "dr_grpo":
      log.info("rl.loss=dr_grpo: centred advantages (no std) and the seq_mean_token_sum_norm "
               "normaliser (rl.advantage_scale=%s and rl.aggregation=%s are not used)",
               rl.advantage_scale, rl.aggregation)
    self.nonfinite = run_lib.NonFiniteGuard(config.train.max_consecutive_nonfinite)
    self.no_variance_updates = 0  # updates skipped: no group with reward variance to train on
    self.evaluator = run_lib.make_evaluator(config, self.model_cfg, self.tokenizer, extra_evaluator)
    self.writer = run_lib.MetricsWriter(
        self.run_dir, self.total_steps, initial_step=self.step,
        tensorboard=config.logging.tensorboard, progress_bar=config.logging.progress_bar)

  def _make_refiner(self) -> refinement_lib.Refiner:
    rl = self.config.rl
    critic_generate, critic_tokenizer = None, None
    if rl.refinement.critique == "critic":
      critic_generate, critic_tokenizer = refinement_lib.critic_generator(rl)
    return refinement_lib.Refiner(
        rl, self.tokenizer,
        refinement_lib.policy_generator(self.model_params, self.model_cfg, rl, self.tokenizer),
        self._score, critic_generate=critic_generate, critic_tokenizer=critic_tokenizer,
        same_rows=_max_over_processes, seed=self.config.train.seed)

  def _score(self, groups: list[rollout_lib.Group]) -> None:
    rl = self.config.rl
    rollout_lib.score_groups(groups, self.rewards, self.tokenizer, max_new_tokens=rl.max_new_tokens,
                             overlong_buffer=rl.overlong_buffer, overlong_factor=rl.overlong_penalty)

  # -- one step ------------------------------------------------------------------------------------

  def _collect(self) -> rollout_lib.Rollout:
    config, rl = self.config, self.config.rl
    # One key on every process: generation is one global program over all processes' rows.
    step_rng = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), self.step)

    def sample(prompts, draw):
      return rollout_lib.sample_groups(self.model_params(), self.model_cfg, prompts, rl, self.tokenizer,
                                       jax.random.fold_in(step_rng, draw))

    draws = iter(range(rl.max_draws))

    def score(groups):  # with refinements: critique, refine and score them before the group filter
      self._score(groups)
      if self.refiner is not None:
        self.refiner.refine(groups, jax.random.fold_in(jax.random.fold_in(step_rng, 1 << 20),
                                                       next(draws)))

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
      advantages = np.asarray(losses.group_advantages(rewards, group_ids=group_ids,
                                                      scale=objective(rl)[1], eps=rl.advantage_eps))
    batch = rollout_lib.build_update_batch(
        rollout.groups, advantages, self.prompts_per_host * refinement_lib.rows_per_group(rl),
        seq_buckets=tuple(rl.seq_buckets) or None, mask_truncated=rl.mask_truncated,
        pad_id=sampling.pad_id(self.tokenizer), longest=longest)
    return _split_rows(batch, rl.mini_batches)

  def reference_model_params(self) -> Any:
    """The KL reference: the loaded initial policy of a full fine-tune; for a LoRA run its frozen
    base with the adapters off (`lora.adapters_off`: B = 0 adds exactly zero, and the base keeps its
    own copies of trained modules): no second copy."""
    if self.frozen is None:
      return self.ref_params
    return state_lib.model_params(lora.adapters_off(self.state.params), self.frozen)

  def _score_reference_and_old(self, batches: list[dict[str, jax.Array]]) -> float | None:
    """Adds ref_logp / recomputed old_logp to the global batches; returns the recomputed gap."""
    gap_sum, tokens = 0.0, 0.0
    reference = self.reference_model_params() if uses_reference(self.config.rl) else None
    for batch in batches:
      if reference is not None:
        batch["ref_logp"], _ = self.score_log_probs(reference, batch)
      if self.config.rl.recompute_old_logp:
        if self.config.rl.tis_cap:
          batch["sampler_logp"] = batch["old_logp"]
        batch["old_logp"], gap = self.score_log_probs(self.model_params(), batch)
        gap_sum += float(gap)
        tokens += float(jnp.sum(batch["completion_mask"]))
    return gap_sum / max(tokens, 1.0) if self.config.rl.recompute_old_logp else None

  def train_step(self, log_now: bool) -> dict[str, float]:
    """One rollout + update step; returns its metrics (always gathered: the rollout is on the host)."""
    del log_now
    started = time.perf_counter()
    rollout = self._collect()
    metrics = rollout_lib.rollout_metrics(rollout, self.config.rl.group_size)
    if self.refiner is not None:
      metrics |= self.refiner.take_metrics()
    phase_started = time.perf_counter()
    host_batches = self._update_batches(rollout)
    batches = [parallel.host_local_to_global(b) for b in host_batches]
    recomputed_gap = self._score_reference_and_old(batches)
    jax.block_until_ready(batches)
    reference_time = time.perf_counter() - phase_started
    phase_started = time.perf_counter()
    update_metrics = []
    for _ in range(self.config.rl.ppo_epochs):
      for batch in batches:
        self.state, step_metrics = self.update(self.state, batch, self.frozen)
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
      self.no_variance_updates += self.updates_per_step
      log.warning("step %d: no group with reward variance to train on; its %d update(s) were skipped "
                  "(%d so far)", self.step + 1, self.updates_per_step, self.no_variance_updates)
    step_time = time.perf_counter() - started
    tokens = sum(int(np.count_nonzero(b["segment_ids"])) for b in host_batches) * jax.process_count()
    generated = sum(int(g.lengths.sum()) for g in rollout.sampled)
    metrics |= {"time_rollout_s": rollout.rollout_time_s, "time_reward_s": rollout.reward_time_s,
                "time_reference_s": reference_time, "time_update_s": update_time,
                "step_time_s": step_time, "tokens_per_s": tokens / step_time,
                "rollout_tokens_per_s": generated / max(rollout.rollout_time_s, 1e-9),
                "reward_errors": float(self.rewards.error_count),
                "skipped_updates": float(self.skipped_updates()),
                "skipped_updates_no_variance": float(self.no_variance_updates)}
    return metrics

  def skipped_updates(self) -> int:
    """Updates skipped in this call: for a NaN / inf, or for no group with reward variance."""
    return self.nonfinite.total + self.no_variance_updates

  def close(self) -> None:
    self.rewards.close()
    super().close()


def train(config: Any, extra_evaluator: run_lib.EvaluatorFactory | None = None) -> dict[str, Any]:
  """Trains (or resumes) the GRPO run in config.train.run_dir; returns and writes its summary.

  extra_evaluator: as for `cftjax.train.cft.train` (held-out verdict accuracy of generated critiques).
  The summary has the CFT run's keys (steps, total_steps, start_step, preempted,
  final_train_metrics, initial_eval / final_eval, best_value, data_counts, wall_time_s), so
  `run.format_summary` prints both.
  """
  return run_lib.run_in_mesh(config, lambda: GRPORun(config, extra_evaluator))
