"""LoRA and the int8 base (`model.lora`): untrained adapters leave the logits exactly the base's, a step
changes only adapters (the optimizer holds nothing for the base) and gives the same result on every
mesh, the adapters' loss equals the merged model's, int8 numerics against the float base, GRPO with
a KL term scores its reference on the base without loading reference params, and a CFT run's frozen
base is the warm start it trains first (model.init_from_run, model.warmstart_config)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cftjax import config as config_lib
from cftjax import launch, parallel, sampling
from cftjax.data import synthetic
from cftjax.config import ConfigError
from cftjax.models import Decoder, ModelConfig, checkpoint_io, init_params, lora
from cftjax.models.checkpoint_io import fresh_base_params
from cftjax.train import cft, grpo, losses
from cftjax.train import run as run_lib
from cftjax.train import state as state_lib
from tests.test_cft_step import CFG, make_batch, mesh_of
from tests.test_grpo_run import smoke_config

LORA = CFG.replace(lora_rank=4, lora_alpha=8.0)
TOKENS = (np.arange(2 * 12).reshape(2, 12) * 7 % CFG.vocab_size).astype(np.int32)


def trained_adapters(cfg: ModelConfig, seed: int = 1) -> dict:
  """Adapters with random (non-zero) A and B, as after some training."""
  adapters = lora.split(init_params(cfg, jax.random.key(0)))[1]
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("attention", ["xla", "cpu"])
def test_untrained_adapters_leave_the_logits_exactly_the_base(attention):
  cfg = LORA.replace(attention=attention)
  params = init_params(cfg, jax.random.key(0))
  base, adapters = lora.split(params)
  assert all(not np.any(a["b"]) for group in adapters["layers"].values() for a in group.values())
  assert set(adapters["layers"]["attn"]) == {"q_lora", "k_lora", "v_lora", "o_lora"}
  assert set(adapters["layers"]["mlp"]) == {"gate_lora", "up_lora", "down_lora"}
  np.testing.assert_array_equal(Decoder(cfg).apply({"params": params}, TOKENS),
                                Decoder(cfg.without_lora()).apply({"params": base}, TOKENS))
  # The sampler (prefill + the backend's decode layout) too; XLA fuses the decode loop with adapters
  # differently, which moved one log-prob by 1 float32 ulp (4.8e-7) on the CPU layout.
  prompts = [[1, 2, 3, 4], [5, 6]]
  with_adapters = sampling.generate(params, cfg, prompts, rng=jax.random.key(0), max_new_tokens=6)
  plain = sampling.generate(base, cfg.without_lora(), prompts, rng=jax.random.key(0), max_new_tokens=6)
  np.testing.assert_array_equal(with_adapters.tokens, plain.tokens)
  np.testing.assert_allclose(with_adapters.logprobs, plain.logprobs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("attention", ["xla", "cpu"])
def test_unmerged_adapters_equal_the_merged_model(attention):
  """x W + (alpha / r) x A B in every layout == the decoder on W + (alpha / r) A B (float32)."""
  cfg = LORA.replace(attention=attention, lora_targets=("q", "o", "up", "down"))
  base = init_params(cfg.without_lora(), jax.random.key(0))
  params = lora.combine(base, trained_adapters(cfg))
  merged = lora.merge(cfg, params)
  assert set(merged["layers"]["attn"]) == set(base["layers"]["attn"])
  for name in ("k_kernel", "v_kernel"):  # not targeted: unchanged
    np.testing.assert_array_equal(merged["layers"]["attn"][name], base["layers"]["attn"][name])
  np.testing.assert_allclose(Decoder(cfg).apply({"params": params}, TOKENS),
                             Decoder(cfg.without_lora()).apply({"params": merged}, TOKENS), atol=2e-5)
  prompts = [[1, 2, 3, 4], [5, 6]]
  unmerged = sampling.generate(params, cfg, prompts, rng=jax.random.key(0), max_new_tokens=6)
  plain = sampling.generate(merged, cfg.without_lora(), prompts, rng=jax.random.key(0), max_new_tokens=6)
  np.testing.assert_array_equal(unmerged.tokens, plain.tokens)
  np.testing.assert_allclose(unmerged.logprobs, plain.logprobs, atol=2e-5)


def test_a_step_trains_only_the_adapters_on_every_mesh():
  batch = make_batch()
  tx = optax.adam(1e-2)
  results = {}
  for shape in [(1, 1, 1), (1, 8, 1), (2, 2, 2)]:
    with parallel.use_mesh(mesh_of(*shape)):
      state = state_lib.create_train_state(LORA, tx, jax.random.key(0))
      frozen = jax.device_put(fresh_base_params(LORA.without_lora(), 0), state_lib.frozen_shardings(LORA))
      before = jax.device_get((state.params, frozen))
      step = cft.make_cft_step(LORA, tx, micro_batches=2, chunk_size=40)
      for _ in range(2):
        state, metrics = step(state, batch, frozen)
      results[shape] = jax.device_get((state.params, frozen, metrics["loss"]))
  params0, frozen0 = before
  # The train state holds the adapters alone; the optimizer's moments mirror them and nothing else.
  assert jax.tree.structure(params0) == jax.tree.structure(lora.split(init_params(LORA, jax.random.key(0)))[1])
  adam = state.opt_state[0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(params0)
  for shape, (params, frozen, loss) in results.items():
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen0)  # the base: bit for bit
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), params, params0)
    assert all(jax.tree.leaves(changed)), shape  # after two steps both A and B have moved
    ref_params, _, ref_loss = results[(1, 1, 1)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, ref_params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  # Adapter shardings follow the logical rules: A of q shards "embed" over fsdp, B "heads" over tensor.
  with parallel.use_mesh(mesh_of(2, 2, 2)):
    shardings = state_lib.train_state_shardings(LORA, tx).params["layers"]["attn"]["q_lora"]
    assert tuple(shardings["a"].spec) == (None, "fsdp", None)
    assert tuple(shardings["b"].spec) == (None, None, "tensor", None)


def test_modules_to_save_train_copies_of_the_embedding_and_lm_head_and_the_base_keeps_its_own():
  """model.lora.modules_to_save = ("embed_tokens", "lm_head") (PEFT's modules_to_save): the trained
  embedding and lm_head start as the base's copies (logits exactly the base's), sharded as the base's,
  the optimizer holds moments for them and the adapters, a step moves them while the frozen base keeps
  the originals, which the adapters-off params (GRPO's KL reference) use; a tied head is refused."""
  cfg = LORA.replace(lora_modules_to_save=("embed_tokens", "lm_head"))
  tx = optax.adam(1e-2)
  with parallel.use_mesh(mesh_of(1, 8, 1)):
    frozen = jax.device_put(fresh_base_params(cfg.without_lora(), 0), state_lib.frozen_shardings(cfg))
    state = state_lib.create_train_state(cfg, tx, jax.random.key(0), frozen=frozen)
    for name in ("embedding", "lm_head"):
      assert state.params[name].sharding.spec == frozen[name].sharding.spec, name
    start = jax.device_get(state.params)
    state, _ = cft.make_cft_step(cfg, tx, chunk_size=40)(state, make_batch(), frozen)
    trained, frozen = jax.device_get((state.params, frozen))
  base_logits = Decoder(cfg.without_lora()).apply({"params": frozen}, TOKENS)
  assert set(trained) == {"layers", "embedding", "lm_head"}
  assert jax.tree.structure(state.opt_state[0].mu) == jax.tree.structure(trained)
  merged = lora.merge(cfg, lora.combine(frozen, trained))
  for name in ("embedding", "lm_head"):
    np.testing.assert_array_equal(start[name], frozen[name])
    assert float(np.abs(trained[name] - frozen[name]).max()) > 1e-3, name
    np.testing.assert_array_equal(merged[name], trained[name])
  np.testing.assert_array_equal(Decoder(cfg).apply({"params": lora.combine(frozen, start)}, TOKENS),
                                base_logits)
  np.testing.assert_array_equal(
      Decoder(cfg).apply({"params": lora.combine(frozen, lora.adapters_off(trained))}, TOKENS), base_logits)
  with pytest.raises(ConfigError, match=r"model.lora.modules_to_save=\('embed_tokens',\) needs an untied lm_head"):
    LORA.replace(lora_modules_to_save=("embed_tokens",), tie_embeddings=True)
  with pytest.raises(ConfigError, match=r"model.lora.modules_to_save=\('embedding',\): name each of "
                     r"\('embed_tokens', 'lm_head'\) at most once"):
    LORA.replace(lora_modules_to_save=("embedding",))


def test_adapter_loss_equals_the_merged_models_and_dropout_is_off_without_a_key():
  batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
  cfg = LORA.replace(lora_dropout=0.3)
  base = init_params(cfg.without_lora(), jax.random.key(0))
  params = lora.combine(base, trained_adapters(cfg))
  with parallel.use_mesh(mesh_of(1, 1, 1)):  # jitted, as in a step (the sharded CE needs a trace)
    adapted = jax.jit(lambda p: losses.ce_sums(cfg, p, batch, chunk_size=64))(params)
    merged = jax.jit(lambda p: losses.ce_sums(cfg.without_lora(), p, batch, chunk_size=64))(
        lora.merge(cfg, params))
    dropped = jax.jit(lambda p, key: losses.ce_sums(cfg, p, batch, chunk_size=64, dropout_rng=key))(
        params, jax.random.key(5))
  np.testing.assert_allclose(adapted["loss_sum"], merged["loss_sum"], rtol=1e-5)
  assert abs(float(dropped["loss_sum"] - adapted["loss_sum"])) > 1e-3


def test_int8_base_stays_close_to_the_float_base():
  """Per-channel absmax int8: each kernel within half a step (scale / 2) of the float one; logits of
  the int8 base against the float32 base on a random tiny model within 1% of their range."""
  cfg = LORA.replace(quantize_base="int8")
  base = init_params(cfg.without_lora(), jax.random.key(0))
  quantized = lora.quantize_base(cfg, base)
  q = quantized["layers"]["attn"]["q_kernel"]
  scale = quantized["layers"]["attn"]["q_kernel_scale"]
  assert q.dtype == jnp.int8 and scale.shape == (CFG.num_layers, CFG.num_heads, CFG.head_dim)
  error = np.abs(lora.dequantize_base(cfg, quantized)["layers"]["attn"]["q_kernel"] - base["layers"]["attn"]["q_kernel"])
  assert np.all(error <= np.asarray(scale)[:, None] / 2 + 1e-7)
  adapters = trained_adapters(cfg)
  int8_logits = Decoder(cfg).apply({"params": lora.combine(quantized, adapters)}, TOKENS)
  float_logits = Decoder(cfg.replace(quantize_base="none")).apply({"params": lora.combine(base, adapters)}, TOKENS)
  spread = float(np.ptp(float_logits))
  assert float(np.max(np.abs(int8_logits - float_logits))) < 0.01 * spread


def test_grpo_with_lora_and_kl_loads_no_reference_params(tmp_path, monkeypatch):
  def no_reference(*args, **kwargs):
    raise AssertionError("a LoRA run must not load reference params")

  monkeypatch.setattr(grpo, "reference_params", no_reference)
  world = str(tmp_path / "world")
  synthetic.write_world(world, num_train=40, num_heldout=8)
  config = smoke_config(world, str(tmp_path / "run"), steps=2)
  config.data.eval_template = "crl"  # the held-out rows of data.eval_path are CRL rows
  config.model.lora.rank = 4
  config.model.lora.quantize_base = "int8"
  config.rl.recompute_old_logp = True
  config.rl.ppo_epochs = 2
  summary = launch.train(config)
  assert summary["steps"] == 2
  with open(os.path.join(str(tmp_path / "run"), "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if '"train"' in line]
  # The KL term was computed against the base (adapters off), never a loaded reference copy. Step 1's
  # first update has B = 0, so policy == reference; whether later updates move the adapters depends on
  # the tiny model's rewards having variance (updates without it are skipped), so no KL > 0 is asserted.
  assert config.rl.kl_coef > 0
  assert all(np.isfinite(r["kl"]) and r["kl"] >= 0 for r in rows)
  assert rows[0]["kl"] < 1e-2


WARM_START_CONFIG = """
from cftjax.config import base_config

def get_config():
  c = base_config()
  c.data.synthetic_world = True
  c.data.max_seq_len = 128
  c.data.batch_size = 8
  c.data.packing = False
  for key, value in dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=16, max_position_embeddings=128).items():
    c.model.arch[key] = value
  c.optim.lr = 1e-3
  c.train.steps = 5
  c.train.chunk_size = 512
  c.checkpoint.async_save = False
  c.eval.at_start = False
  c.eval.loss_batches = 1
  c.eval.batch_size = 8
  c.eval.verdict_examples = 0
  c.logging.tensorboard = False
  c.logging.progress_bar = False
  return c
"""


def test_lora_cft_trains_its_warm_start_first_and_adapts_that_runs_params(tmp_path):
  """model.init_from_run + model.warmstart_config on a CFT LoRA run (configs/demo_cft_lora.py): the
  CFT warm start is trained first in the run's world, the run takes its architecture, and its frozen
  base is exactly the selected params of that run, so with B = 0 the first held-out loss is the warm
  start's last one."""
  warm_config = tmp_path / "warm.py"
  warm_config.write_text(WARM_START_CONFIG)
  world, base_dir, run_dir = (str(tmp_path / name) for name in ("world", "base", "lora"))
  c = config_lib.load_config(str(warm_config), [
      ("train.run_dir", run_dir), ("train.steps", "2"), ("eval.at_start", "True"),
      ("data.world_dir", world), ("data.world.num_train", "40"), ("data.world.num_heldout", "8"),
      ("model.arch.hidden_size", "64"), ("model.lora.rank", "4"), ("optim.lr", "2e-2"),
      ("model.init_from_run", base_dir + ":latest"), ("model.warmstart_config", str(warm_config)),
      ("model.warmstart_steps", "3")])
  summary = launch.train(c)

  base_summary = run_lib.read_summary(base_dir)
  assert (base_summary["steps"], summary["steps"]) == (3, 2)
  run_config = checkpoint_io.read_run_config(run_dir)
  assert run_config.model.arch.hidden_size == 32  # the warm start's, not this config's 64
  assert checkpoint_io.read_run_config(base_dir).data.world_dir == world
  base_cfg, base_params, _ = checkpoint_io.load_run(base_dir + ":latest")
  frozen = checkpoint_io.lora_base_params(run_config, base_cfg)
  jax.tree.map(np.testing.assert_array_equal, frozen, base_params)
  np.testing.assert_allclose(summary["initial_eval"]["eval_loss"],
                             base_summary["final_eval"]["eval_loss"], rtol=1e-6)
  _, merged, _ = checkpoint_io.load_run(run_dir)  # base + the trained adapters
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(merged), jax.tree.leaves(base_params))) > 1e-4
