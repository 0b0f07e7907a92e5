"""GRPO advantages, surrogate, KL and aggregation against float64 numpy versions of the formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cftjax.train import losses


# ----------------------------------------------------------------------------------------------
# Float64 numpy references, written from REFERENCE.md section 2.


def np_advantages(rewards, group_ids, scale, eps=1e-6):
  rewards = np.asarray(rewards, np.float64)
  out = np.zeros_like(rewards)
  batch_std = rewards.std(ddof=1) if len(rewards) > 1 else 0.0
  for gid in np.unique(group_ids):
    idx = np.flatnonzero(group_ids == gid)
    if len(idx) == 1:
      continue
    centred = rewards[idx] - rewards[idx].mean()
    std = {"group_std": rewards[idx].std(ddof=1), "batch_std": batch_std, "none": None}[scale]
    out[idx] = centred if std is None else centred / (std + eps)
  return out


def np_surrogate(logp, old_logp, adv, eps_low, eps_high, dual_clip=None, clamp=20.0):
  log_ratio = np.clip(logp - old_logp, -clamp, clamp)
  ratio = np.exp(log_ratio)
  a = adv[:, None]
  clipped_ratio = np.clip(ratio, 1 - eps_low if eps_low is not None else -np.inf,
                          1 + eps_high if eps_high is not None else np.inf)
  loss = -np.minimum(ratio * a, clipped_ratio * a)
  if dual_clip is not None:
    loss = np.where(a < 0, np.minimum(loss, -dual_clip * a), loss)
  return loss


def np_aggregate(token_losses, mask, mode, max_len=None):
  seq_tokens = mask.sum(1)
  live = seq_tokens > 0
  if mode == "token_mean":
    return (token_losses * mask).sum() / mask.sum()
  if mode == "seq_mean_token_mean":
    return ((token_losses * mask).sum(1)[live] / seq_tokens[live]).mean()
  return (token_losses * mask).sum() / (live.sum() * (max_len or mask.shape[1]))


def _batch(seed=0, batch=6, seq=9, spread=0.4):
  rng = np.random.default_rng(seed)
  old_logp = -rng.random((batch, seq)) * 3
  logp = old_logp + rng.normal(size=(batch, seq)) * spread
  adv = rng.normal(size=batch)
  mask = (rng.random((batch, seq)) > 0.25).astype(np.float64)
  mask[2] = 0.0  # an all-padding row
  mask[:, 0] = np.where(np.arange(batch) == 2, 0.0, 1.0)
  return logp, old_logp, adv, mask


# ----------------------------------------------------------------------------------------------
# Advantages.


@pytest.mark.parametrize("scale", ["group_std", "batch_std", "none"])
def test_group_advantages_match_numpy(scale):
  rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.2, 0.9, 0.9, 0.9, 0.9, 0.3, 0.0])
  np.testing.assert_allclose(losses.group_advantages(rewards, group_size=4, scale=scale),
                             np_advantages(rewards, np.arange(12) // 4, scale),
                             rtol=1e-5, atol=1e-6)
  # Unordered ids with groups of one (ids 3 and 7) and an all-equal group (id 5).
  ids = np.array([0, 3, 0, 5, 5, 0, 7, 1, 1, 1, 5, 0])
  adv = losses.group_advantages(rewards, group_ids=ids, scale=scale)
  np.testing.assert_allclose(adv, np_advantages(rewards, ids, scale), rtol=1e-5, atol=1e-6)
  assert adv[1] == 0.0 and adv[6] == 0.0


@pytest.mark.parametrize("scale", ["group_std", "batch_std", "none"])
def test_all_equal_rewards_and_groups_of_one_give_zero(scale):
  for rewards, group_size in ((np.full(8, 0.7), 4), (np.arange(5.0), 1)):
    adv = losses.group_advantages(rewards, group_size=group_size, scale=scale)
    np.testing.assert_array_equal(adv, 0.0)


def test_group_advantages_jit_and_bad_groups():
  rewards = jnp.array([1.0, 0.0, 1.0, 1.0])
  jitted = jax.jit(lambda r, g: losses.group_advantages(r, group_ids=g))(
      rewards, jnp.array([0, 0, 1, 1]))
  np.testing.assert_allclose(jitted, np_advantages(rewards, np.array([0, 0, 1, 1]), "group_std"),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="group_size=3"):
    losses.group_advantages(rewards, group_size=3)
  with pytest.raises(ValueError, match="group_ids"):
    losses.group_advantages(rewards, group_ids=np.array([0, 0, 9, 9]))
  with pytest.raises(ValueError, match="scale"):
    losses.group_advantages(rewards, group_size=2, scale="std")


# ----------------------------------------------------------------------------------------------
# Surrogate, clipping and its gradient.


@pytest.mark.parametrize("eps_low,eps_high,dual_clip", [
    (0.2, 0.2, None), (0.2, 0.28, None), (None, None, None), (0.2, 0.3, 3.0), (None, 0.28, None)])
def test_surrogate_and_clip_indicators_match_numpy(eps_low, eps_high, dual_clip):
  logp, old_logp, adv, mask = _batch(spread=1.0)
  terms = losses.policy_loss_terms(logp, old_logp, adv, mask, eps_low, eps_high, dual_clip)
  ref = np_surrogate(logp, old_logp, adv, eps_low, eps_high, dual_clip)
  np.testing.assert_allclose(terms["token_loss"], ref * mask, rtol=1e-5, atol=1e-6)
  ratio = np.exp(logp - old_logp)
  a = adv[:, None]
  low = (a < 0) & (ratio < 1 - eps_low) if eps_low is not None else np.zeros_like(mask, bool)
  high = (a > 0) & (ratio > 1 + eps_high) if eps_high is not None else np.zeros_like(mask, bool)
  dual = (a < 0) & (ratio > dual_clip) if dual_clip else np.zeros_like(mask, bool)
  np.testing.assert_array_equal(terms["clipped_low"], low * mask)
  np.testing.assert_array_equal(terms["clipped_high"], high * mask)
  np.testing.assert_array_equal(terms["dual_clipped"], dual * mask)
  if eps_low is not None and eps_high is not None:
    assert (low * mask).sum() > 0 and (high * mask).sum() > 0
  if dual_clip:
    assert (dual * mask).sum() > 0


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_gradient_is_zero_exactly_on_clipped_tokens(dual_clip):
  logp, old_logp, adv, mask = _batch(seed=1, spread=1.0)

  def total(lp):
    terms = losses.policy_loss_terms(lp, old_logp, adv, mask, 0.2, 0.28, dual_clip)
    return jnp.sum(terms["token_loss"])

  grad = np.asarray(jax.grad(total)(jnp.asarray(logp, jnp.float32)))
  terms = losses.policy_loss_terms(logp, old_logp, adv, mask, 0.2, 0.28, dual_clip)
  clipped = (np.asarray(terms["clipped_low"]) + np.asarray(terms["clipped_high"])
             + np.asarray(terms["dual_clipped"])) > 0
  assert clipped.sum() >= 3
  assert np.all(grad[clipped] == 0.0)
  live = (mask > 0) & ~clipped
  # Unclipped: d/dlogp of -rho*A is -rho*A.
  np.testing.assert_allclose(grad[live], (-np.exp(logp - old_logp) * adv[:, None])[live], rtol=1e-5)
  assert np.all(grad[live] != 0.0)
  assert np.all(grad[mask == 0] == 0.0)


def test_log_ratio_clamp_bounds_ratio():
  logp = np.array([[0.0, -1.0, -50.0]])
  old_logp = np.array([[-40.0, -1.0, 0.0]])
  terms = losses.policy_loss_terms(logp, old_logp, np.array([1.0]), np.ones((1, 3)), None, None)
  np.testing.assert_allclose(terms["ratio"], [[np.exp(20.0), 1.0, np.exp(-20.0)]], rtol=1e-5)
  np.testing.assert_allclose(terms["log_ratio"], [[20.0, 0.0, -20.0]])
  unclamped = losses.policy_loss_terms(logp, old_logp, np.array([1.0]), np.ones((1, 3)), None, None,
                                       log_ratio_clamp=None)
  np.testing.assert_allclose(unclamped["log_ratio"], [[40.0, 0.0, -50.0]])


def test_garbage_log_probs_off_mask_do_not_leak_nan():
  logp, old_logp, adv, mask = _batch(seed=2)
  old_logp = np.where(mask > 0, old_logp, -np.inf)
  logp = np.where(mask > 0, logp, -np.inf)

  def loss(lp):
    return losses.grpo_loss(lp, old_logp, adv, mask, ref_logp=old_logp, kl_coef=0.1,
                            log_ratio_clamp=None, refined_mask=np.arange(len(adv)) == 0)["loss_sum"]

  value, grad = jax.value_and_grad(loss)(jnp.asarray(logp, jnp.float32))
  assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_critique_grpo_shaping_on_refined_tokens():
  logp, old_logp, adv, mask = _batch(seed=3)
  refined = np.zeros(len(adv), bool)
  refined[-1] = True

  def total(lp):
    return jnp.sum(losses.policy_loss_terms(lp, old_logp, adv, mask, None, None,
                                            refined_mask=refined)["token_loss"])

  grad = np.asarray(jax.grad(total)(jnp.asarray(logp, jnp.float32)))
  prob = np.exp(logp[-1])
  gamma, a = 0.1, adv[-1]
  terms = losses.policy_loss_terms(logp, old_logp, adv, mask, None, None, refined_mask=refined)
  np.testing.assert_allclose(terms["token_loss"][-1], mask[-1] * -prob / (prob + gamma) * a,
                             rtol=1e-5)
  np.testing.assert_allclose(grad[-1], mask[-1] * -a * gamma * prob / (prob + gamma) ** 2,
                             rtol=1e-5)
  np.testing.assert_allclose(terms["token_loss"][:-1],
                             (np_surrogate(logp, old_logp, adv, None, None) * mask)[:-1], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# KL.


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_estimators_with_clamps(kind):
  logp = np.array([[-1.0, -2.0, -0.5, -30.0, 0.0]])
  ref_logp = np.array([[-1.5, -1.0, -0.5, 0.0, -3.0]])
  diff = np.clip(ref_logp - logp, -20, 20)
  expected = -diff if kind == "k1" else np.clip(np.exp(diff) - diff - 1, -10, 10)
  np.testing.assert_allclose(losses.kl_penalty(logp, ref_logp, kind), expected, rtol=1e-5)
  if kind == "k3":
    assert float(losses.kl_penalty(logp, ref_logp, kind)[0, 3]) == 10.0  # clamped k3
    no_clamp = losses.kl_penalty(logp, ref_logp, kind, clamp=None, k3_clamp=None)
    np.testing.assert_allclose(no_clamp[0, 1], np.exp(1.0) - 2.0, rtol=1e-6)
  else:
    assert float(losses.kl_penalty(logp, ref_logp, kind)[0, 3]) == -20.0  # clamped difference
  with pytest.raises(ValueError, match="k2"):
    losses.kl_penalty(logp, ref_logp, "k2")


# ----------------------------------------------------------------------------------------------
# Aggregation and global normalisation.


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_aggregation_modes_match_numpy(mode):
  _, _, _, mask = _batch(seed=4)
  token_losses = np.random.default_rng(4).normal(size=mask.shape)
  for max_len in (None, 16):
    numerator, denominator = losses.aggregate(token_losses, mask, mode, max_len)
    np.testing.assert_allclose(numerator / denominator,
                               np_aggregate(token_losses, mask, mode, max_len), rtol=1e-5)
  with pytest.raises(ValueError, match="token_sum"):
    losses.aggregate(token_losses, mask, "token_sum")


def _micro_objective(lm_head, hidden, targets, old_logp, ref_logp, adv, mask, mode, global_den):
  logp, _ = losses.chunked_token_log_probs(hidden, lm_head, targets, chunk_size=4, temperature=0.8)
  out = losses.grpo_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.05, eps_low=0.2,
                         eps_high=0.28, dual_clip=3.0, aggregation=mode, max_response_len=12)
  return out["loss_sum"] / global_den


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_gradient_accumulation_invariance(mode):
  rng = np.random.default_rng(5)
  batch, seq, dim, vocab = 6, 10, 8, 23
  hidden = rng.normal(size=(batch, seq, dim)).astype(np.float32)
  lm_head = rng.normal(size=(dim, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, (batch, seq))
  old_logp = np.asarray(losses.chunked_token_log_probs(hidden, lm_head * 1.05, targets, 4, 0.8)[0])
  ref_logp = old_logp + rng.normal(size=old_logp.shape).astype(np.float32) * 0.1
  adv = rng.normal(size=batch).astype(np.float32)
  lengths = np.array([10, 2, 0, 7, 5, 9])  # unequal token counts per micro-batch, one empty row
  mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.float32)
  value_and_grad = jax.jit(jax.value_and_grad(_micro_objective), static_argnums=7)

  full_den = losses.aggregation_denominator(mask, mode, 12)
  full_loss, full_grad = value_and_grad(lm_head, hidden, targets, old_logp, ref_logp, adv, mask,
                                        mode, full_den)
  splits = [slice(0, 3), slice(3, 6)]  # same shapes (one compile), 12 vs 21 tokens
  global_den = sum(losses.aggregation_denominator(mask[s], mode, 12) for s in splits)
  np.testing.assert_allclose(global_den, full_den)
  micro = [value_and_grad(lm_head, hidden[s], targets[s], old_logp[s], ref_logp[s], adv[s], mask[s],
                          mode, global_den) for s in splits]
  np.testing.assert_allclose(sum(m[0] for m in micro), full_loss, rtol=1e-5)
  np.testing.assert_allclose(sum(m[1] for m in micro), full_grad, rtol=1e-5, atol=1e-7)
  assert np.abs(np.asarray(full_grad)).max() > 0


def test_grpo_loss_combines_terms_and_metrics():
  logp, old_logp, adv, mask = _batch(seed=6, spread=1.0)
  ref_logp = logp + 0.3
  out = losses.grpo_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.1, kl_kind="k3",
                         eps_low=0.2, eps_high=0.28, aggregation="seq_mean_token_mean")
  pg = np_surrogate(logp, old_logp, adv, 0.2, 0.28)
  kl = np.exp(0.3) - 0.3 - 1
  expected = np_aggregate(pg + 0.1 * kl, mask, "seq_mean_token_mean")
  np.testing.assert_allclose(out["loss_sum"] / out["denominator"], expected, rtol=1e-5)
  np.testing.assert_allclose(out["kl_sum"], kl * mask.sum(), rtol=1e-4)
  ratio = np.exp(logp - old_logp)[mask > 0]
  np.testing.assert_allclose(out["ratio_sum"], ratio.sum(), rtol=1e-5)
  np.testing.assert_allclose([out["ratio_min"], out["ratio_max"]], [ratio.min(), ratio.max()],
                             rtol=1e-5)
  np.testing.assert_allclose(out["token_count"], mask.sum())
  a = adv[:, None]
  ratio_all = np.exp(logp - old_logp)
  np.testing.assert_allclose(out["clip_low_sum"], (mask * ((a < 0) & (ratio_all < 0.8))).sum())
  np.testing.assert_allclose(out["clip_high_sum"], (mask * ((a > 0) & (ratio_all > 1.28))).sum())
  assert out["clip_low_sum"] + out["clip_high_sum"] > 0
  no_kl = losses.grpo_loss(logp, old_logp, adv, mask, aggregation="seq_mean_token_mean")
  assert float(no_kl["kl_sum"]) == 0.0
  with pytest.raises(ValueError, match="ref_logp"):
    losses.grpo_loss(logp, old_logp, adv, mask, kl_coef=0.1)


# ----------------------------------------------------------------------------------------------
# The policy-loss family with per-token advantages, weights and refined (off-policy) tokens,
# against float64 versions of the published formulas (REFERENCE.md "Policy objectives the peers
# ship"; GSPO arXiv 2507.18071, CISPO arXiv 2506.13585, Critique-GRPO arXiv 2506.03106).

GAMMA = 0.1


def np_policy_loss(logp, old_logp, adv, mask, loss_type, eps_low, eps_high, refined, clamp=20.0):
  """(token losses [B, T], d(sum_t w_t l_t)/d logp for w = 1, as a function of per-token weights)."""
  low = 1 - eps_low if eps_low is not None else -np.inf
  high = 1 + eps_high if eps_high is not None else np.inf
  log_ratio = np.clip(logp - old_logp, -clamp, clamp) * mask
  tokens = np.maximum(mask.sum(1, keepdims=True), 1.0)
  if loss_type in ("gspo", "gspo_token"):
    ratio = np.broadcast_to(np.exp(np.clip(log_ratio.sum(1, keepdims=True) / tokens, -clamp, clamp)),
                            mask.shape)
  else:
    ratio = np.exp(log_ratio)
  clipped = np.clip(ratio, low, high)
  if loss_type == "cispo":
    loss = -clipped * adv * logp
    dloss = -clipped * adv  # the weight is stop-gradient
  else:
    loss = -np.minimum(ratio * adv, clipped * adv)
    unclipped = (ratio * adv <= clipped * adv)  # the min picks the unclipped term
    dloss_dratio = np.where(unclipped, -adv, 0.0)
    if loss_type == "gspo":  # d s_i / d logp_u = s_i m_u / |y_i|: every token of the sequence
      dloss = None  # needs the weights: see np_policy_grad
    else:
      dloss = dloss_dratio * ratio  # grpo: d r_t/d logp_t = r_t; gspo_token: sg(s) * 1
  prob = np.exp(logp)
  loss = np.where(refined > 0, -prob / (prob + GAMMA) * adv, loss)
  shaped_grad = -adv * GAMMA * prob / (prob + GAMMA) ** 2
  if dloss is not None:
    dloss = np.where(refined > 0, shaped_grad, dloss)
  return loss * mask, (dloss, ratio, dloss_dratio if loss_type == "gspo" else None, shaped_grad)


def np_policy_grad(weights, mask, refined, parts):
  """d/dlogp of sum_t w_t m_t l_t from np_policy_loss's parts."""
  dloss, ratio, dloss_dratio, shaped_grad = parts
  if dloss is not None:
    return weights * mask * dloss
  tokens = np.maximum(mask.sum(1, keepdims=True), 1.0)
  on_policy = weights * mask * (refined == 0)
  seq = (on_policy * dloss_dratio).sum(1, keepdims=True) * ratio / tokens  # sum_t w_t dl_t/ds ds/dlogp_u
  return mask * np.where(refined > 0, weights * shaped_grad, seq * (refined == 0))


def _per_token_batch(seed):
  logp, old_logp, adv, mask = _batch(seed=seed, spread=0.3)
  rng = np.random.default_rng(seed + 100)
  token_adv = (adv[:, None] + rng.normal(size=mask.shape) * 0.3) * mask
  weights = rng.uniform(0.2, 2.0, mask.shape) * mask
  refined = np.zeros(mask.shape)
  refined[4] = mask[4]  # one off-policy refinement row
  return logp, old_logp, token_adv, mask, weights, refined


@pytest.mark.parametrize("loss_type", ["grpo", "gspo", "gspo_token", "cispo"])
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.28), (None, None), (3e-4, 4e-4)])
def test_policy_losses_match_float64_formulas_with_weights_and_refined_rows(loss_type, eps_low, eps_high):
  logp, old_logp, adv, mask, weights, refined = _per_token_batch(seed=7)

  def total(lp):
    terms = losses.policy_loss_terms(lp, old_logp, adv, mask, eps_low, eps_high,
                                     refined_mask=refined, shaping_gamma=GAMMA, loss_type=loss_type)
    return jnp.sum(jnp.asarray(weights, jnp.float32) * terms["token_loss"]), terms

  (_, terms), grad = jax.value_and_grad(total, has_aux=True)(jnp.asarray(logp, jnp.float32))
  ref_loss, parts = np_policy_loss(logp, old_logp, adv, mask, loss_type, eps_low, eps_high, refined)
  np.testing.assert_allclose(terms["token_loss"], ref_loss, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(grad, np_policy_grad(weights, mask, refined, parts), rtol=2e-4, atol=1e-6)
  on_policy = (mask > 0) & (refined == 0)
  np.testing.assert_allclose(np.asarray(terms["ratio"])[on_policy], parts[1][on_policy], rtol=2e-5)
  assert np.all(np.asarray(grad)[mask == 0] == 0.0)
  if (loss_type, eps_low) in (("grpo", 0.2), ("gspo", 3e-4), ("gspo_token", 3e-4)):  # some clip
    assert (np.asarray(terms["clipped_low"]) + np.asarray(terms["clipped_high"])).sum() > 0


def test_gspo_token_equals_gspo_when_advantages_are_per_sequence():
  logp, old_logp, adv, mask = _batch(seed=8, spread=0.3)

  def total(lp, loss_type):
    return jnp.sum(losses.policy_loss_terms(lp, old_logp, adv, mask, 3e-4, 4e-4,
                                            loss_type=loss_type)["token_loss"])

  lp = jnp.asarray(logp, jnp.float32)
  values = [jax.value_and_grad(total)(lp, t) for t in ("gspo", "gspo_token")]
  np.testing.assert_allclose(values[0][0], values[1][0], rtol=1e-6)
  np.testing.assert_allclose(values[0][1], values[1][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_grpo_loss_weights_entropy_bonus_and_kl_match_float64(mode):
  logp, old_logp, adv, mask, weights, refined = _per_token_batch(seed=9)
  rng = np.random.default_rng(9)
  entropy = rng.uniform(0.1, 3.0, mask.shape)
  ref_logp = logp + 0.3

  def loss(lp, ent):
    out = losses.grpo_loss(lp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.05, kl_kind="k1",
                           eps_low=0.2, eps_high=0.28, aggregation=mode, max_response_len=12,
                           refined_mask=refined, loss_type="grpo", token_weights=weights,
                           entropy=ent, entropy_coef=0.001)
    return out["loss_sum"] / out["denominator"], out

  (value, out), (_, dent) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      jnp.asarray(logp, jnp.float32), jnp.asarray(entropy, jnp.float32))
  pg, _ = np_policy_loss(logp, old_logp, adv, mask, "grpo", 0.2, 0.28, refined)
  kl = -(ref_logp - logp)
  expected = (np_aggregate(weights * pg, mask, mode, 12) + 0.05 * np_aggregate(kl, mask, mode, 12)
              - 0.001 * np_aggregate(entropy, mask, mode, 12))
  np.testing.assert_allclose(value, expected, rtol=2e-5)
  np.testing.assert_allclose(out["weight_sum"], (weights * mask).sum(), rtol=1e-5)
  # d loss / d entropy_t = -coef * (the token's share of the aggregate).
  share = {"token_mean": mask / mask.sum(),
           "seq_mean_token_mean": mask / np.maximum(mask.sum(1, keepdims=True), 1)
           / (mask.sum(1) > 0).sum(),
           "seq_mean_token_sum_norm": mask / ((mask.sum(1) > 0).sum() * 12)}[mode]
  np.testing.assert_allclose(dent, -0.001 * share, rtol=1e-5, atol=1e-12)
  with pytest.raises(ValueError, match="entropy"):
    losses.grpo_loss(logp, old_logp, adv, mask, entropy_coef=0.01)


def test_truncated_importance_weights_match_float64():
  rng = np.random.default_rng(10)
  old_logp = -rng.random((4, 6)) * 3
  sampler_logp = old_logp + rng.normal(size=old_logp.shape)
  sampler_logp[0, 0] = old_logp[0, 0] + 60.0  # exp would underflow: weight ~0
  sampler_logp[0, 1] = old_logp[0, 1] - 60.0  # exp would overflow: the cap
  expected = np.minimum(np.exp(old_logp - sampler_logp), 2.0)
  weights = losses.truncated_is_weights(old_logp, sampler_logp, 2.0)
  np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-30)
  assert float(weights[0, 1]) == 2.0 and 0 < expected[1:].min() < 1 < expected[1:].max() <= 2
  with pytest.raises(ValueError, match="cap"):
    losses.truncated_is_weights(old_logp, sampler_logp, 0.0)
