"""GRPO rollouts: G samples per prompt from the current params, rewards with DAPO shaping (overlong
penalty, dynamic sampling of zero-variance groups), the padded update batch and rollout metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import logging
import time
from typing import Any

import jax
import numpy as np

from cftjax import sampling
from cftjax.models import ModelConfig

log = logging.getLogger(__name__)

Prompt = dict[str, Any]  # {"prompt_ids": int32 [P], "record": CritiqueRecord, "source": str, "task": str}


@dataclasses.dataclass
class Group:
  """One prompt and its G completions (host numpy); rewards / texts are filled by `score_groups`."""

  prompt: Prompt
  completions: list[np.ndarray]  # G int32 arrays, each ending in its stop token unless truncated
  logprobs: list[np.ndarray]  # G float32 arrays: the sampler's log-probs of those tokens
  truncated: np.ndarray  # [G] bool: hit max_new_tokens without stopping
  texts: list[str] = dataclasses.field(default_factory=list)
  scores: np.ndarray | None = None  # [G] task rewards (before shaping)
  rewards: np.ndarray | None = None  # [G] rewards used for the advantages (after shaping)
  # [G] bool: off-policy completions (Critique-GRPO refinements, sampled from another prompt), trained
  # with the shaped ratio instead of the clipped one. None = all on-policy.
  refined: np.ndarray | None = None

  def __post_init__(self):
    if self.refined is None:
      self.refined = np.zeros(len(self.completions), bool)

  def append(self, other: "Group", rows: Sequence[int], refined: bool) -> None:
    """Adds `other`'s scored completions `rows` to this group (as refinements when `refined`)."""
    rows = list(rows)
    self.completions += [other.completions[i] for i in rows]
    self.logprobs += [other.logprobs[i] for i in rows]
    self.texts += [other.texts[i] for i in rows]
    self.truncated = np.concatenate([self.truncated, other.truncated[rows]])
    self.scores = np.concatenate([self.scores, other.scores[rows]])
    self.rewards = np.concatenate([self.rewards, other.rewards[rows]])
    self.refined = np.concatenate([self.refined, np.full(len(rows), refined)])

  @property
  def lengths(self) -> np.ndarray:
    return np.array([len(c) for c in self.completions], np.int32)

  @property
  def has_reward_variance(self) -> bool:
    return bool(self.rewards.max() > self.rewards.min())


# ------------------------------------------------------------------------------------------------
# Sampling and scoring.


def sample_rows(params: Any, model_cfg: ModelConfig, rows: Sequence[np.ndarray], rl: Any, tokenizer: Any,
                rng: jax.Array, max_new_tokens: int | None = None
                ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
  """One completion per prompt row from `params` (used as they are: no copy): (tokens [L_i] int32,
  sampler log-probs [L_i] float32, truncated [N] bool), in the order of `rows`.

  rl: the config's `rl` section (max_new_tokens unless given, temperature, top_k, top_p,
  stop_strings, prompt_buckets, generation_batch_size, cache_dtype). tokenizer: its eos_ids stop a
  completion, its pad id pads (`sampling.pad_id`); it also matches rl.stop_strings. rng: a PRNG key;
  generate call i draws with fold_in(rng, i).
  generation_batch_size: rows per generate call, 0 = all rows at once. Rows are sorted by prompt
  length before they are cut into calls, and each call's prompts are padded to a length bucket
  (rl.prompt_buckets, () = powers of two), so the compiled shapes come from a small fixed set and
  steady state never recompiles. With several processes every one must pass the same number of rows.
  """
  order = np.argsort([len(r) for r in rows], kind="stable")
  call_rows = rl.generation_batch_size or len(rows)
  tokens, logprobs, truncated = [None] * len(rows), [None] * len(rows), np.zeros(len(rows), bool)
  for call, start in enumerate(range(0, len(rows), call_rows)):
    chosen = order[start:start + call_rows]
    batch = [rows[i] for i in chosen]
    batch += [batch[-1]] * (call_rows - len(batch))  # one compiled shape for every call
    result = sampling.generate(
        params, model_cfg, batch, rng=jax.random.fold_in(rng, call),
        max_new_tokens=max_new_tokens or rl.max_new_tokens, temperature=rl.temperature,
        top_k=rl.top_k, top_p=rl.top_p, stop_ids=tuple(tokenizer.eos_ids),
        stop_strings=tuple(rl.stop_strings), tokenizer=tokenizer, cache_dtype=rl.cache_dtype,
        pad_id=sampling.pad_id(tokenizer), prompt_buckets=tuple(rl.prompt_buckets) or None)
    for j, row in enumerate(chosen):
      n = int(result.lengths[j])
      tokens[row], logprobs[row] = result.tokens[j, :n].copy(), result.logprobs[j, :n].copy()
      truncated[row] = bool(result.truncated[j])
  return tokens, logprobs, truncated


def sample_groups(params: Any, model_cfg: ModelConfig, prompts: Sequence[Prompt], rl: Any,
                  tokenizer: Any, rng: jax.Array) -> list[Group]:
  """rl.group_size completions for each prompt from `params` (see `sample_rows`)."""
  group_size = rl.group_size
  rows = [p["prompt_ids"] for p in prompts for _ in range(group_size)]
  tokens, logprobs, truncated = sample_rows(params, model_cfg, rows, rl, tokenizer, rng)
  return [Group(prompt, tokens[g * group_size:(g + 1) * group_size],
                logprobs[g * group_size:(g + 1) * group_size],
                truncated[g * group_size:(g + 1) * group_size])
          for g, prompt in enumerate(prompts)]


def overlong_penalty(lengths: np.ndarray, max_new_tokens: int, buffer: int, factor: float = 1.0
                     ) -> np.ndarray:
  """DAPO soft overlong punishment [N]: 0 up to max_new_tokens - buffer tokens, then falling
  linearly to -factor at max_new_tokens. buffer 0 turns it off."""
  if buffer <= 0:
    return np.zeros(len(lengths), np.float32)
  if buffer > max_new_tokens:
    raise ValueError(f"rl.overlong_buffer={buffer} exceeds rl.max_new_tokens={max_new_tokens}")
  excess = np.maximum(np.asarray(lengths, np.float32) - (max_new_tokens - buffer), 0.0)
  return -factor * np.minimum(excess / buffer, 1.0)


def score_groups(groups: Sequence[Group], reward_fn: Callable[..., Sequence[Any]], tokenizer: Any, *,
                 max_new_tokens: int, overlong_buffer: int = 0, overlong_factor: float = 1.0) -> None:
  """Decodes every completion and fills texts, scores (reward_fn's) and rewards (+ overlong penalty).

  reward_fn(completions, records, tasks) -> results with a `.score` (a `RewardComputer`).
  """
  texts, records, tasks = [], [], []
  for group in groups:
    group.texts = [tokenizer.decode(c, skip_special_tokens=True) for c in group.completions]
    texts += group.texts
    records += [group.prompt["record"]] * len(group.texts)
    tasks += [group.prompt["task"]] * len(group.texts)
  scores = np.array([r.score for r in reward_fn(texts, records, tasks)], np.float32)
  start = 0
  for group in groups:
    group.scores = scores[start:start + len(group.texts)]
    group.rewards = group.scores + overlong_penalty(group.lengths, max_new_tokens, overlong_buffer,
                                                    overlong_factor)
    start += len(group.texts)


# ------------------------------------------------------------------------------------------------
# Dynamic sampling.


@dataclasses.dataclass
class Rollout:
  """What one GRPO step collected: the groups it trains on and everything it sampled."""

  groups: list[Group]  # at most prompts_per_step groups for the update
  sampled: list[Group]  # every group drawn this step (reward metrics describe these)
  draws: int  # prompt batches drawn
  dropped_zero_std: int  # groups dropped for equal rewards (dynamic sampling)
  surplus: int  # groups with reward variance beyond prompts_per_step, not trained on
  missing: int  # prompts_per_step - len(groups): rows left fully masked in the update batch
  rollout_time_s: float = 0.0
  reward_time_s: float = 0.0


def collect_rollout(draw_prompts: Callable[[], list[Prompt]],
                    sample: Callable[[list[Prompt], int], list[Group]],
                    score: Callable[[list[Group]], None], *, prompts_per_step: int,
                    dynamic_sampling: bool = False, max_draws: int = 1,
                    any_process: Callable[[bool], bool] = bool) -> Rollout:
  """Draws prompt batches, samples and scores them until prompts_per_step groups are kept.

  Without dynamic sampling one batch is drawn and all its groups are kept. With it (DAPO), groups
  whose rewards are all equal (zero advantage everywhere) are dropped and more prompts are drawn,
  up to max_draws batches; a step that still falls short trains on the groups it has (the rest of
  the update batch stays masked) and says so in the log and the counts.
  sample(prompts, draw_index) -> groups; score(groups) fills their rewards.
  any_process(flag) -> whether flag is true on any JAX process: with several processes every one
  draws (and generates, a collective) until none needs more groups.
  """
  if max_draws < 1:
    raise ValueError(f"rl.max_draws={max_draws}: at least one prompt batch must be drawn")
  kept, sampled = [], []
  rollout = Rollout([], sampled, 0, 0, 0, 0)
  while rollout.draws < (max_draws if dynamic_sampling else 1) and any_process(
      len(kept) < prompts_per_step):
    prompts = draw_prompts()
    started = time.perf_counter()
    groups = sample(prompts, rollout.draws)
    rollout.rollout_time_s += time.perf_counter() - started
    started = time.perf_counter()
    score(groups)
    rollout.reward_time_s += time.perf_counter() - started
    rollout.draws += 1
    sampled += groups
    for group in groups:
      if dynamic_sampling and not group.has_reward_variance:
        rollout.dropped_zero_std += 1
      else:
        kept.append(group)
  rollout.groups = kept[:prompts_per_step]
  rollout.surplus = len(kept) - len(rollout.groups)
  rollout.missing = prompts_per_step - len(rollout.groups)
  if rollout.missing:
    log.warning("dynamic sampling: only %d of %d groups had reward variance after %d draws "
                "(rl.max_draws); %d groups of the update batch stay masked", len(rollout.groups),
                prompts_per_step, rollout.draws, rollout.missing)
  return rollout


# ------------------------------------------------------------------------------------------------
# The update batch.


def group_rewards(groups: Sequence[Group]) -> tuple[np.ndarray, np.ndarray]:
  """(rewards [N], group ids [N]) of the groups' completions, row-major by group."""
  rewards = np.concatenate([g.rewards for g in groups]).astype(np.float32)
  group_ids = np.concatenate([np.full(len(g.rewards), i, np.int32) for i, g in enumerate(groups)])
  return rewards, group_ids


def longest_row(groups: Sequence[Group]) -> int:
  """Tokens in the longest prompt + completion of the groups (0 without groups)."""
  return max((len(g.prompt["prompt_ids"]) + len(c) for g in groups for c in g.completions), default=0)


def build_update_batch(groups: Sequence[Group], advantages: Sequence[Any], num_rows: int, *,
                       seq_buckets: Sequence[int] | None = None, mask_truncated: bool = False,
                       pad_id: int = 0, longest: int | None = None,
                       token_weights: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """The GRPO update batch (host numpy) of the groups' completions, padded to num_rows rows.

  advantages: one entry per completion (row-major by group): a scalar (the sequence's advantage on
  each of its tokens) or a float array [L_i] (one per completion token). token_weights: None (1 on
  every completion token) or one float array [L_i] per completion (per-token loss weights).
  Row r is prompt + completion, right padded; with ids x_0..x_{n-1}: inputs = x[:-1], targets =
  x[1:]. Width T: the smallest of seq_buckets (default powers of two >= 16) >= longest - 1, where
  longest defaults to `longest_row(groups)` (pass the longest over all processes so their batches
  have one shape; groups may then be empty: all rows masked).
  Returns, all [num_rows, T]: inputs, targets, positions, segment_ids (1 on real tokens, 0 on
  padding), completion_mask (1 where the target is a generated token, stop token included; 0 on
  prompt, padding, extra rows and, with mask_truncated, truncated completions), old_logp (the
  sampler's log-probs aligned to targets), advantages and token_weights (on completion targets, 0
  elsewhere) and refined_mask (1 on the targets of off-policy completions: `Group.refined`).
  """
  rows = [(g.prompt["prompt_ids"], c, lp, t, f)
          for g in groups for c, lp, t, f in zip(g.completions, g.logprobs, g.truncated, g.refined)]
  if len(rows) > num_rows:
    raise ValueError(f"{len(rows)} completions do not fit an update batch of {num_rows} rows")
  if len(advantages) != len(rows):
    raise ValueError(f"{len(advantages)} advantages for {len(rows)} completions")
  if token_weights is not None and len(token_weights) != len(rows):
    raise ValueError(f"{len(token_weights)} token-weight arrays for {len(rows)} completions")
  width = sampling.bucket_length((longest or longest_row(groups)) - 1, seq_buckets)
  tokens = np.full((num_rows, width + 1), pad_id, np.int32)
  batch = {key: np.zeros((num_rows, width), np.float32)
           for key in ("completion_mask", "old_logp", "advantages", "token_weights", "refined_mask")}
  batch["segment_ids"] = np.zeros((num_rows, width), np.int32)
  for r, (prompt, completion, logprobs, truncated, refined) in enumerate(rows):
    start, end = len(prompt), len(prompt) + len(completion)
    targets = slice(start - 1, end - 1)
    tokens[r, :start], tokens[r, start:end] = prompt, completion
    batch["segment_ids"][r, :end - 1] = 1
    batch["old_logp"][r, targets] = logprobs
    batch["advantages"][r, targets] = _per_completion_token(advantages[r], len(completion), "advantages", r)
    batch["token_weights"][r, targets] = (1.0 if token_weights is None else _per_completion_token(
        token_weights[r], len(completion), "token_weights", r))
    batch["refined_mask"][r, targets] = float(refined)
    if not (mask_truncated and truncated):
      batch["completion_mask"][r, targets] = 1.0
  batch["inputs"], batch["targets"] = tokens[:, :-1], tokens[:, 1:]
  batch["positions"] = np.broadcast_to(np.arange(width, dtype=np.int32), (num_rows, width)).copy()
  return batch


def _per_completion_token(value: Any, length: int, what: str, row: int) -> Any:
  """A scalar, or a [length] array checked against the completion's length."""
  if np.ndim(value) == 0:
    return float(value)
  value = np.asarray(value, np.float32)
  if value.shape != (length,):
    raise ValueError(f"{what} of completion {row}: shape {value.shape}, expected ({length},) (one per "
                     "completion token) or a scalar")
  return value


# ------------------------------------------------------------------------------------------------
# Metrics.


def _mean_std(values: np.ndarray) -> tuple[float, float]:
  return float(values.mean()), float(values.std())


def rollout_metrics(rollout: Rollout, group_size: int) -> dict[str, float]:
  """Reward mean / std (all and per source), zero-std group fraction, completion lengths, truncated
  fraction and dynamic-sampling counts of one step's rollout (over every group sampled; rewards,
  lengths and truncation of its on-policy completions: refinements have their own metrics)."""
  sampled = rollout.sampled
  rewards = np.concatenate([g.rewards[~g.refined] for g in sampled])
  scores = np.concatenate([g.scores[~g.refined] for g in sampled])
  lengths = np.concatenate([g.lengths[~g.refined] for g in sampled])
  metrics = {"reward_mean": _mean_std(rewards)[0], "reward_std": _mean_std(rewards)[1],
             "score_mean": float(scores.mean()),
             "zero_std_fraction": float(np.mean([not g.has_reward_variance for g in sampled])),
             "completion_len_mean": float(lengths.mean()), "completion_len_min": float(lengths.min()),
             "completion_len_max": float(lengths.max()),
             "truncated_fraction": float(np.concatenate([g.truncated[~g.refined] for g in sampled]).mean()),
             "draws": float(rollout.draws), "groups_sampled": float(len(sampled)),
             "groups_trained": float(len(rollout.groups)),
             "groups_dropped_zero_std": float(rollout.dropped_zero_std),
             "groups_surplus": float(rollout.surplus), "groups_missing": float(rollout.missing),
             "samples_per_prompt": float(group_size)}
  for source in sorted({g.prompt["source"] for g in sampled}):
    source_rewards = np.concatenate([g.rewards[~g.refined] for g in sampled
                                     if g.prompt["source"] == source])
    metrics[f"reward_mean/{source}"], metrics[f"reward_std/{source}"] = _mean_std(source_rewards)
  return metrics
