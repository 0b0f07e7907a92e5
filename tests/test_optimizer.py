"""make_optimizer: schedules vs closed form, decay mask, clipping, AdamW vs optax and numpy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cftjax import config as config_lib
from cftjax.train.state import decay_mask, make_optimizer


def optim(**fields):
  """The (locked) base config's optim section without warmup, with `fields` set."""
  config = config_lib.base_config()
  config.lock()
  config.optim.warmup_ratio = 0.0
  config.optim.update(fields)
  return config.optim


def _closed_form_lr(step, lr, warmup, total, kind, min_ratio):
  if step < warmup:
    return lr * step / warmup
  progress = min((step - warmup) / (total - warmup), 1.0)
  if kind == "cosine":
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
  if kind == "linear":
    return lr * (1 - (1 - min_ratio) * progress)
  return lr


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [{"warmup_steps": 10}, {"warmup_ratio": 0.05}, {}])
def test_schedule_values_match_closed_form(kind, warmup):
  total = 110
  _, schedule = make_optimizer(optim(lr=3e-4, schedule=kind, min_lr_ratio=0.1, **warmup), total)
  warmup_steps = warmup.get("warmup_steps", math.ceil(warmup.get("warmup_ratio", 0.0) * total))
  for step in (0, 1, 3, 5, 9, 10, 11, 37, 60, 109, 110, 150):
    np.testing.assert_allclose(float(schedule(step)),
                               _closed_form_lr(step, 3e-4, warmup_steps, total, kind, 0.1),
                               rtol=1e-5, atol=1e-12, err_msg=f"step {step}")


def _sample_params():
  return {
      "embedding": jnp.ones((11, 4)),
      "layers": {
          "attn": {"q_kernel": jnp.ones((2, 4, 4)), "q_bias": jnp.ones((2, 4)),
                   "q_norm": {"scale": jnp.ones((2, 4))}},
          "input_norm": {"scale": jnp.ones((2, 4))},
          "mlp": {"gate_kernel": jnp.ones((2, 4, 8))},
      },
      "final_norm": {"scale": jnp.ones(4)},
      "lm_head": jnp.ones((4, 11)),
      "gate": {"scale": jnp.ones(3)},
  }


def test_decay_mask_by_path():
  expected = {
      "embedding": True,
      "layers": {"attn": {"q_kernel": True, "q_bias": False, "q_norm": {"scale": False}},
                 "input_norm": {"scale": False}, "mlp": {"gate_kernel": True}},
      "final_norm": {"scale": False},
      "lm_head": True,
      "gate": {"scale": False},
  }
  assert decay_mask(_sample_params()) == expected
  expected["embedding"] = False
  assert decay_mask(_sample_params(), decay_embeddings=False) == expected


def test_config_errors_name_the_key():
  with pytest.raises(config_lib.ConfigError, match="'config.optim.learning_rate'"):
    config_lib.set_override(config_lib.base_config(), "optim.learning_rate", "1e-5")
  with pytest.raises(config_lib.ConfigError, match="optim.schedule"):
    make_optimizer(optim(lr=1e-5, schedule="step"), 10)
  with pytest.raises(config_lib.ConfigError, match="optim.lr"):
    make_optimizer(optim(lr=None), 10)
  with pytest.raises(config_lib.ConfigError, match="optim.lr"):
    make_optimizer(optim(lr=-1e-5), 10)
  with pytest.raises(config_lib.ConfigError, match="warmup"):
    make_optimizer(optim(lr=1e-5, warmup_steps=10), 10)
  with pytest.raises(config_lib.ConfigError, match="optim.warmup_steps=2 and optim.warmup_ratio=0.1"):
    make_optimizer(optim(lr=1e-5, warmup_steps=2, warmup_ratio=0.1), 10)
  tx, schedule = make_optimizer(optim(lr=1e-5, schedule="constant"), 10)
  assert float(schedule(5)) == pytest.approx(1e-5)
  tx.init(_sample_params())


def test_base_config_warmup_ratio_applies():
  _, schedule = make_optimizer(config_lib.base_config().optim, 100)
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(5e-6)


def _grads(params, seed, scale=1.0):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return treedef.unflatten(
      [jnp.asarray(rng.normal(size=x.shape) * scale, jnp.float32) for x in leaves])


def test_one_step_equals_optax_adamw():
  params = _grads(_sample_params(), 0)
  grads = _grads(params, 1)
  cfg = optim(lr=1e-3, schedule="constant", b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1,
              grad_clip_norm=None)
  tx, _ = make_optimizer(cfg, 100)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  ref_tx = optax.adamw(1e-3, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1, mask=decay_mask)
  ref_updates, _ = jax.jit(ref_tx.update)(grads, ref_tx.init(params), params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                         updates, ref_updates)


def _np_adamw_steps(params, grad_list, lrs, b1, b2, eps, wd, clip, mask):
  """Float64 AdamW with global-norm clipping, written from the AdamW paper."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, (grads, lr) in enumerate(zip(grad_list, lrs), start=1):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    norm = math.sqrt(sum((x**2).sum() for x in g.values()))
    g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      adam = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
      p[k] = p[k] - lr * (adam + (wd * p[k] if mask[k] else 0.0))
  return p


def test_three_steps_with_clipping_schedule_and_mask_match_numpy():
  params = {"w_kernel": jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32),
            "norm_scale": jnp.ones(4), "bias": jnp.full(4, 0.5)}
  grad_list = [_grads(params, seed, scale) for seed, scale in ((1, 50.0), (2, 0.01), (3, 3.0))]
  cfg = optim(lr=1e-2, schedule="cosine", warmup_steps=1, min_lr_ratio=0.1, b1=0.9, b2=0.99,
              eps=1e-8, weight_decay=0.3, grad_clip_norm=1.0)
  tx, schedule = make_optimizer(cfg, 4)
  state, current, update = tx.init(params), params, jax.jit(tx.update)
  for grads in grad_list:
    updates, state = update(grads, state, current)
    current = optax.apply_updates(current, updates)
  lrs = [float(schedule(step)) for step in range(3)]
  assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-2)
  expected = _np_adamw_steps(params, grad_list, lrs, 0.9, 0.99, 1e-8, 0.3, 1.0,
                             {"w_kernel": True, "norm_scale": False, "bias": False})
  for name, value in expected.items():
    np.testing.assert_allclose(current[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("clip", [0.5, None])
def test_clipping_bounds_what_adam_sees(clip):
  params = _sample_params()
  grads = _grads(params, 4, scale=100.0)
  grad_norm = float(optax.tree.norm(grads))
  tx, _ = make_optimizer(optim(lr=1e-3, b1=0.9, grad_clip_norm=clip), 10)
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  adam_state = next(s for s in jax.tree_util.tree_leaves(
      state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
      if isinstance(s, optax.ScaleByAdamState))
  first_moment_norm = float(optax.tree.norm(adam_state.mu))
  expected = 0.1 * (min(grad_norm, clip) if clip else grad_norm)
  np.testing.assert_allclose(first_moment_norm, expected, rtol=1e-5)
