"""The 4-bit QLoRA bases (`model.lora.quantize_base` nf4 / int4, `cftjax.models.quant`): NF4 codes,
block absmax and dequantized weights equal bitsandbytes' bit for bit (its CPU backend), the NF4 levels
are the paper's normal quantiles, int4 rounds as a float64 reference does, packing round-trips,
a 4-bit base's logits stay near the float base's, a step on a 4-bit base trains only the adapters, and
bad settings fail naming the config key."""

from __future__ import annotations

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cftjax import parallel
from cftjax.config import ConfigError
from cftjax.models import Decoder, ModelConfig, abstract_params, init_params, lora, quant
from cftjax.models.checkpoint_io import fresh_base_params
from cftjax.train import cft
from cftjax.train import state as state_lib
from tests.test_cft_step import CFG, make_batch, mesh_of
from tests.test_lora import TOKENS, trained_adapters

# Every targeted kernel has a multiple of 64 inputs: hidden 64, heads x head_dim 4 x 16, mlp 128.
Q4 = CFG.replace(hidden_size=64, intermediate_size=128, head_dim=16, lora_rank=4, lora_alpha=8.0,
                 quantize_base="nf4")


def test_nf4_levels_are_the_papers_normal_quantiles():
  """QLoRA appendix E, in float64: 8 positive quantiles of N(0, 1) at linspace(0.9677083, 0.5, 9)[:-1], 7
  negative at linspace(0.9677083, 0.5, 8)[:-1], and 0, divided by the largest."""
  ppf = NormalDist().inv_cdf
  offset = 0.9677083
  levels = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]] + [0.0]
  levels += [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  levels = np.sort(levels) / max(levels)
  np.testing.assert_allclose(quant.NF4_LEVELS, levels, rtol=0, atol=2e-7)  # float32 rounding


@pytest.mark.parametrize("in_dims", [1, 2])
def test_nf4_equals_bitsandbytes_bit_for_bit(in_dims):
  """A kernel [in..., out...] is the torch weight [out, prod(in)]: bitsandbytes' quantize_4bit (block
  64, nf4, CPU) of that weight gives the same packed bytes, absmax and dequantized values."""
  torch = pytest.importorskip("torch")
  functional = pytest.importorskip("bitsandbytes.functional")
  shape = (256, 6) if in_dims == 1 else (4, 32, 6)  # q-like [embed, out] and o-like [heads, head_dim, embed]
  w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  w[:64, ..., 0] = 0.0  # an all-zero block
  n_in, n_out = int(np.prod(shape[:in_dims])), int(np.prod(shape[in_dims:]))
  codes, absmax = quant.quantize(jnp.asarray(w), in_dims, "nf4")
  assert codes.dtype == jnp.uint8 and codes.shape == shape[:in_dims - 1] + (shape[in_dims - 1] // 2,) + shape[in_dims:]
  weight = torch.from_numpy(np.ascontiguousarray(w.reshape(n_in, n_out).T))  # [out, in]
  packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
  np.testing.assert_array_equal(np.asarray(codes).reshape(n_in // 2, n_out).T.ravel(), packed.numpy().ravel())
  np.testing.assert_array_equal(np.asarray(absmax).reshape(n_in // 64, n_out).T.ravel(), state.absmax.numpy())
  np.testing.assert_array_equal(state.code.numpy(), quant.NF4_LEVELS)
  ours = np.asarray(quant.dequantize(codes, absmax, in_dims, "nf4", jnp.float32)).reshape(n_in, n_out).T
  np.testing.assert_array_equal(ours, functional.dequantize_4bit(packed, state).numpy())


def test_int4_rounds_like_a_float64_reference_and_packing_round_trips():
  w = np.random.default_rng(1).standard_normal((128, 3, 4))
  codes, absmax = quant.quantize(jnp.asarray(w, jnp.float32), 1, "int4")
  # float64: per block of 64 inputs, k = round(7 w / absmax) in [-7, 7], stored as k + 8.
  blocks = w.reshape(2, 64, 3, 4)
  ref_absmax = np.abs(blocks).max(axis=1)
  ref_codes = (np.round(7 * blocks / ref_absmax[:, None]) + 8).astype(np.uint8).reshape(128, 3, 4)
  np.testing.assert_allclose(absmax, ref_absmax, rtol=1e-7)
  unpacked = np.stack([np.asarray(codes) >> 4, np.asarray(codes) & 15], axis=1).reshape(128, 3, 4)
  np.testing.assert_array_equal(unpacked, ref_codes)
  # Round trip: every weight within half a level (absmax / 14) of its dequantized value.
  back = np.asarray(quant.dequantize(codes, absmax, 1, "int4", jnp.float32))
  assert np.all(np.abs(back - w).reshape(2, 64, 3, 4) <= ref_absmax[:, None] / 14 + 1e-6)
  again, _ = quant.quantize(jnp.asarray(back), 1, "int4")  # dequantized values quantize to the same codes
  np.testing.assert_array_equal(again, codes)


def test_4bit_base_logits_stay_near_the_float_base():
  """A tiny random model with trained adapters, on its nf4 / int4 base: the logits equal the float32
  model's on the dequantized base (the forward dequantizes exactly), and stay within 15% of the
  float32 base's logit range at most and 10% of their std on average (measured: 9.3% / 4.8% nf4, 9.4% /
  4.0% int4; int8 0.5% / 0.3%)."""
  base = init_params(Q4.without_lora(), jax.random.key(0))
  adapters = trained_adapters(Q4)
  forward = lambda cfg: jax.jit(lambda p: Decoder(cfg).apply({"params": p}, TOKENS))
  float_forward = forward(Q4.replace(quantize_base="none"))
  float_logits = np.asarray(float_forward(lora.combine(base, adapters)))
  for fmt in ("nf4", "int4"):
    cfg = Q4.replace(quantize_base=fmt)
    quantized = jax.jit(lambda p: lora.quantize_base(cfg, p))(base)
    assert quantized["layers"]["mlp"]["down_kernel"].dtype == jnp.uint8
    logits = np.asarray(forward(cfg)(lora.combine(quantized, adapters)))
    dequantized = float_forward(lora.combine(jax.jit(lambda p: lora.dequantize_base(cfg, p))(quantized), adapters))
    np.testing.assert_allclose(logits, dequantized, rtol=0, atol=1e-6)
    error = np.abs(logits - float_logits)
    assert 0 < error.max() < 0.15 * np.ptp(float_logits), fmt
    assert error.mean() < 0.10 * np.std(float_logits), fmt


def test_a_step_on_an_nf4_base_trains_only_the_adapters():
  batch = make_batch()
  tx = optax.adam(1e-2)
  with parallel.use_mesh(mesh_of(1, 2, 2)):
    state = state_lib.create_train_state(Q4, tx, jax.random.key(0))
    quantize = jax.jit(lambda p: lora.quantize_base(Q4, p), out_shardings=state_lib.frozen_shardings(Q4))
    frozen = quantize(fresh_base_params(Q4.without_lora(), 0))
    before = jax.device_get((state.params, frozen))
    step = cft.make_cft_step(Q4, tx, micro_batches=1, chunk_size=64)
    for _ in range(2):  # the first step moves B only (A's gradient is 0 while B = 0)
      state, metrics = step(state, batch, frozen)
    after = jax.device_get((state.params, frozen))
  assert np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, after[1], before[1])  # the packed base: bit for bit
  assert after[1]["layers"]["attn"]["q_kernel"].shape == (CFG.num_layers, 32, CFG.num_heads, 16)
  assert jax.tree.structure(after[0]) == jax.tree.structure(lora.split(init_params(Q4, jax.random.key(0)))[1])
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), after[0], before[0])))


def test_bad_4bit_settings_name_the_config_key():
  with pytest.raises(ConfigError, match=r"model.lora.quantize_base='fp4' is not one of"):
    Q4.replace(quantize_base="fp4")
  with pytest.raises(ConfigError, match=r"model.lora.quantize_base='nf4' quantizes q_kernel in blocks of 64 "
                                        r"inputs packed in pairs, but it has hidden_size = 32"):
    Q4.replace(hidden_size=32)
  # hidden 64 over fsdp 64 shards the float kernel; its packed 32 rows are not divisible by 64.
  mesh = jax.sharding.AbstractMesh((1, 64, 1), parallel.MESH_AXES)
  with parallel.use_mesh(mesh), pytest.raises(ValueError, match=r"packing two 4-bit codes per byte halves "
                                                                 r"the last input axis of layers/attn/q_kernel"):
    state_lib.frozen_shardings(Q4)
