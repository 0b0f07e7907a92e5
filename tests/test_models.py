"""Decoder numerics against transformers, HF import/export round trips, packing and the KV cache."""

from __future__ import annotations

import functools
import json
import os

import jax
from jax.ad_checkpoint import print_saved_residuals
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from cftjax.config import ConfigError
from cftjax.models import Decoder, ModelConfig, attention, init_cache
from cftjax.models.attention import (attention_mask, causal_attention, padded_causal_attention,
                                     sequence_lengths, swiglu_down)
from cftjax.models.checkpoint_io import CheckpointError
from cftjax.models.decoder import decode_caches, decode_step, decode_weights
from cftjax.models.hf_io import iter_hf_tensors, load_hf, save_hf
from tests.hf_reference import VARIANTS, hf_logits, make_hf_model, save_hf_model

SEQ = 64
F32_TOL = 1e-4
GRAD_TOL = 1e-5


def _tokens(vocab, batch=2, seq=SEQ, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int32)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_pair(request, tmp_path_factory):
  model = make_hf_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  save_hf_model(model, path)
  return request.param, model, str(path)


def test_logits_match_transformers_f32(hf_pair):
  _, model, path = hf_pair
  cfg, params = load_hf(path)
  tokens = _tokens(cfg.vocab_size)
  ours = np.asarray(Decoder(cfg).apply({"params": params}, jnp.asarray(tokens)))
  ref = hf_logits(model, tokens)
  assert np.max(np.abs(ours - ref)) <= F32_TOL


def test_bf16_compute_error_is_bounded(hf_pair):
  """bf16 params and compute vs the f32 reference: measured max abs logit error 0.0036-0.0057 over the
  five variants (logits of magnitude ~0.5); asserted below 0.02."""
  _, model, path = hf_pair
  cfg, params = load_hf(path, dtype=jnp.bfloat16, config_overrides={"dtype": "bfloat16"})
  tokens = _tokens(cfg.vocab_size)
  ours = np.asarray(Decoder(cfg).apply({"params": params}, jnp.asarray(tokens)))
  err = np.max(np.abs(ours - hf_logits(model, tokens)))
  print(f"bf16 max abs logit error: {err:.4f}")
  assert err < 0.02


def test_sharded_checkpoint_loads_identically(tmp_path):
  model = make_hf_model("qwen2_untied_bias")
  save_hf_model(model, tmp_path / "one")
  save_hf_model(model, tmp_path / "many", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "many" / "model.safetensors.index.json")
  _, a = load_hf(str(tmp_path / "one"))
  _, b = load_hf(str(tmp_path / "many"))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_export_round_trip_through_transformers(hf_pair, tmp_path):
  variant, model, path = hf_pair
  cfg, params = load_hf(path)
  out = tmp_path / "export"
  files = save_hf(cfg, params, str(out), max_shard_size="30KB")
  assert "model.safetensors.index.json" in files
  reloaded, info = VARIANTS[variant][1].from_pretrained(str(out), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  tokens = _tokens(cfg.vocab_size)
  np.testing.assert_allclose(hf_logits(reloaded.float().eval(), tokens), hf_logits(model, tokens), atol=1e-5)
  auto = transformers.AutoModelForCausalLM.from_pretrained(str(out))
  assert type(auto) is type(model)


def test_gradients_match_transformers_f32(hf_pair):
  """Gradients of sum(logits * fixed noise) w.r.t. every parameter against torch autograd through the
  transformers model; ours are mapped to HF names and layouts by the exporter's `iter_hf_tensors`.
  Measured worst relative error (max abs difference / max abs gradient, per tensor) over the five
  variants: 6.0e-7 to 1.9e-6."""
  _, model, path = hf_pair
  cfg, params = load_hf(path)
  tokens = _tokens(cfg.vocab_size)
  noise = np.random.default_rng(1).standard_normal((*tokens.shape, cfg.vocab_size)).astype(np.float32)
  loss = lambda p: jnp.sum(Decoder(cfg).apply({"params": p}, jnp.asarray(tokens)) * noise)
  ours = dict(iter_hf_tensors(cfg, jax.jit(jax.grad(loss))(params), np.float32))
  model.zero_grad()
  (model(torch.as_tensor(tokens, dtype=torch.long)).logits * torch.from_numpy(noise)).sum().backward()
  reference = {name: p.grad.numpy() for name, p in model.named_parameters()}
  assert ours.keys() == reference.keys()
  errors = {name: np.max(np.abs(ours[name] - ref)) / np.max(np.abs(ref)) for name, ref in reference.items()}
  print(f"worst relative gradient error: {max(errors.values()):.2e} ({max(errors, key=errors.get)})")
  assert max(errors.values()) <= GRAD_TOL, errors


def test_swiglu_keeps_only_gate_and_up_for_the_backward_pass(capsys):
  """Per layer, autodiff stores the two [tokens, intermediate] projections, not silu's intermediates or
  the product (six arrays without the remat)."""
  x, gate_w, up_w = jnp.ones((2, 8, 16)), jnp.ones((16, 40)), jnp.ones((16, 40))
  mlp = lambda x, g, u, d: jnp.sum(swiglu_down(x @ g, x @ u, d))
  print_saved_residuals(mlp, x, gate_w, up_w, jnp.ones((40, 16)))
  saved = capsys.readouterr().out.splitlines()
  assert sum(line.startswith("f32[2,8,40]") for line in saved) == 2, saved


def test_packed_row_equals_separate_sequences(hf_pair):
  _, _, path = hf_pair
  cfg, params = load_hf(path)
  model = Decoder(cfg)
  lengths = [20, 30, 14]
  seqs = [_tokens(cfg.vocab_size, 1, n, seed=i)[0] for i, n in enumerate(lengths)]
  packed = np.concatenate(seqs)[None]
  segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None].astype(np.int32)
  positions = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
  out = np.asarray(model.apply({"params": params}, packed, positions, segment_ids))
  start = 0
  for seq in seqs:
    alone = np.asarray(model.apply({"params": params}, seq[None]))
    np.testing.assert_allclose(out[0, start:start + len(seq)], alone[0], atol=1e-5)
    start += len(seq)


@pytest.mark.parametrize("seq", [300, 1024])
def test_causal_attention_by_blocks_equals_full_masked_attention(seq):
  """Query blocks over key prefixes (uneven blocks at 300, the 8-block cap at 1024), packed segments,
  grouped KV heads: values and gradients equal one masked attention over the whole square."""
  rng = np.random.default_rng(seq)
  q = jnp.asarray(rng.standard_normal((2, seq, 4, 8)), jnp.float32)
  key, value = (jnp.asarray(rng.standard_normal((2, seq, 2, 8)), jnp.float32) for _ in range(2))
  segments = jnp.asarray(np.sort(rng.integers(1, 4, (2, seq)), axis=1), jnp.int32)
  index = jnp.broadcast_to(jnp.arange(seq), (2, seq))
  mask = attention_mask(index, index, segments, segments)
  weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def loss(attend, q, key, value):
    return jnp.sum(weights * attend(q, key, value, mask))

  full = lambda q, key, value, mask: jax.nn.dot_product_attention(q, key, value, mask=mask)
  expected = jax.value_and_grad(functools.partial(loss, full), argnums=(0, 1, 2))(q, key, value)
  actual = jax.value_and_grad(functools.partial(loss, causal_attention), argnums=(0, 1, 2))(q, key, value)
  np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5)
  for got, want in zip(actual[1], expected[1], strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_length_based_causal_attention_equals_masked_attention_on_real_tokens():
  """The cuDNN path's formulation (causal + per-row lengths from segment ids 1..1 0..0, no mask array),
  run with the XLA implementation: values and gradients equal masked attention on every real token."""
  rng = np.random.default_rng(0)
  seq, lengths = 48, np.array([48, 30, 5])
  segments = jnp.asarray((np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32))
  real = np.asarray(segments, bool)[:, :, None, None]
  q = jnp.asarray(rng.standard_normal((3, seq, 4, 8)), jnp.float32)
  key, value = (jnp.asarray(rng.standard_normal((3, seq, 2, 8)), jnp.float32) for _ in range(2))
  index = jnp.broadcast_to(jnp.arange(seq), (3, seq))
  mask = attention_mask(index, index, segments, segments)
  weights = jnp.asarray(rng.standard_normal(q.shape) * real, jnp.float32)  # loss on real tokens only

  def loss(attend, q, key, value):
    return jnp.sum(weights * attend(q, key, value))

  masked = lambda q, key, value: causal_attention(q, key, value, mask)
  by_length = lambda q, key, value: padded_causal_attention(q, key, value, sequence_lengths(segments),
                                                            implementation="xla")
  np.testing.assert_array_equal(sequence_lengths(segments), lengths)
  np.testing.assert_allclose(np.where(real, by_length(q, key, value), 0),
                             np.where(real, masked(q, key, value), 0), atol=1e-6)
  expected = jax.grad(functools.partial(loss, masked), argnums=(0, 1, 2))(q, key, value)
  actual = jax.grad(functools.partial(loss, by_length), argnums=(0, 1, 2))(q, key, value)
  for got, want in zip(actual, expected, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5)


CPU_BACKENDS = sorted(name for name, b in attention.BACKENDS.items() if "cpu" in b.platforms and name != "xla")


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("packed", [True, False])
def test_backend_attention_equals_xla(name, packed):
  """Each backend that runs on CPU gives the values and gradients of "xla" (masked
  `jax.nn.dot_product_attention`), on packed rows (segment ids with padding) and on plain rows."""
  rng = np.random.default_rng(1)
  seq = 200
  q = jnp.asarray(rng.standard_normal((2, seq, 4, 8)), jnp.float32)
  key, value = (jnp.asarray(rng.standard_normal((2, seq, 2, 8)), jnp.float32) for _ in range(2))
  segments = jnp.asarray(np.sort(rng.integers(0, 4, (2, seq)), axis=1)[:, ::-1].copy(), jnp.int32)
  segments = segments if packed else None
  weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def loss(attend, q, key, value):
    return jnp.sum(weights * attend(q, key, value, segments))

  grad = lambda attend: jax.value_and_grad(functools.partial(loss, attend), argnums=(0, 1, 2))(q, key, value)
  expected, actual = grad(attention.xla_attention), grad(attention.BACKENDS[name].attend)
  np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5)
  for got, want in zip(actual[1], expected[1], strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_auto_attention_resolves_per_platform():
  assert [attention.resolve("auto", p) for p in ("cpu", "gpu", "tpu", "other")] == [
      "cpu", "blocked", "splash", "xla"]
  assert attention.resolve("cudnn", "cpu") == "cudnn"
  assert attention.backend("auto") is attention.BACKENDS[attention.resolve("auto", jax.default_backend())]
  assert ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                     num_kv_heads=1, head_dim=4).attention == "auto"


def test_attention_choices_that_cannot_run_are_named():
  small = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
               head_dim=4)
  with pytest.raises(ConfigError, match=r"attention='flash'; choose one of \('auto', 'xla', 'blocked', 'cpu', 'cudnn', 'splash'\)"):
    ModelConfig(**small, attention="flash")
  with pytest.raises(ConfigError, match="attention='cudnn' needs dtype bfloat16 or float16, got dtype='float32'"):
    ModelConfig(**small, attention="cudnn")
  with pytest.raises(ConfigError, match=r"^model.attention='cudnn' runs on GPUs only \(JAX's backend here is "
                     r"'cpu'\); set --config.model.attention=auto$"):
    attention.check_backend("cudnn", "cpu", packed_rows=False)
  with pytest.raises(ConfigError, match=r"^model.attention='cudnn' takes one sequence per row: set "
                     r"--config.data.packing=False, or --config.model.attention=auto$"):
    attention.check_backend("cudnn", "gpu", packed_rows=True)
  attention.check_backend("cudnn", "gpu", packed_rows=False)
  for platform in ("cpu", "gpu", "tpu"):
    for name in ("auto", "xla", "blocked"):
      attention.check_backend(name, platform, packed_rows=True)


def test_incremental_decoding_matches_full_forward(hf_pair):
  _, _, path = hf_pair
  cfg, params = load_hf(path)
  model = Decoder(cfg)
  tokens = _tokens(cfg.vocab_size, 2, 24)
  full = np.asarray(model.apply({"params": params}, tokens))
  cache = init_cache(cfg, 2, 32)
  prefix = 8
  pos = np.broadcast_to(np.arange(prefix, dtype=np.int32), (2, prefix))
  logits, cache = model.apply({"params": params}, tokens[:, :prefix], pos, cache=cache)
  np.testing.assert_allclose(np.asarray(logits), full[:, :prefix], atol=1e-5)
  prefill_cache = cache
  step = jax.jit(lambda c, t, p: model.apply({"params": params}, t, p, cache=c))
  for t in range(prefix, tokens.shape[1]):
    logits, cache = step(cache, tokens[:, t:t + 1], np.full((2, 1), t, np.int32))
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-5)

  # The sampler's decode path through the dispatch, each decode layout (layers unrolled over
  # per-layer caches): "cpu" ([out, in] weights, fused scores), "xla" (standard weights).
  # As the sampler lays out rows of different lengths: every row writes decode slot t (after the
  # prefix "bucket"); row 1 is a 6-token prompt whose slots 6 and 7 hold padding it never sees, then
  # its decoded tokens, so it must match a forward over tokens[1, :6] followed by tokens[1, 8:].
  short = np.asarray(model.apply({"params": params}, np.concatenate([tokens[1:, :6], tokens[1:, prefix:]], 1)))
  slots = np.arange(32)
  for name in ("cpu", "xla"):
    decode = attention.BACKENDS[name].decode
    layer_caches = decode_caches(decode, prefill_cache)
    step = jax.jit(lambda c, t, p, s, v, d=decode: decode_step(cfg, d, decode_weights(cfg, d, params),
                                                                t, p, s, v, c))
    for t in range(prefix, tokens.shape[1]):
      visible = np.stack([slots <= t, (slots < 6) | ((slots >= prefix) & (slots <= t))])
      positions = np.array([t, t - 2], np.int32)
      logits, layer_caches = step(layer_caches, tokens[:, t], positions, np.int32(t), visible)
      np.testing.assert_allclose(np.asarray(logits)[0], full[0, t], atol=1e-4, err_msg=name)
      np.testing.assert_allclose(np.asarray(logits)[1], short[0, t - 2], atol=1e-4, err_msg=name)


def test_unsupported_model_type_lists_supported(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
  with pytest.raises(CheckpointError, match=r"gpt2.*supported: qwen2, qwen3, llama"):
    load_hf(str(tmp_path))


def test_unsupported_rope_scaling_is_an_error():
  with pytest.raises(ConfigError, match=r"yarn.*supported: llama3"):
    ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                num_kv_heads=1, head_dim=4, model_type="llama", rope_scaling={"rope_type": "yarn"})


def _save_tensors(model, path, drop=None, reshape=None):
  from safetensors.torch import save_file
  save_hf_model(model, path)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  if drop:
    del state[drop]
  if reshape:
    state[reshape] = state[reshape][:-1].contiguous()
  save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
  model = make_hf_model("qwen2_untied_bias")
  _save_tensors(model, tmp_path, drop="model.layers.1.mlp.up_proj.weight")
  with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
    load_hf(str(tmp_path))


def test_wrong_shape_is_named(tmp_path):
  model = make_hf_model("qwen2_untied_bias")
  _save_tensors(model, tmp_path, reshape="model.layers.0.self_attn.k_proj.weight")
  with pytest.raises(CheckpointError, match=r"k_proj\.weight.*shape"):
    load_hf(str(tmp_path))


def test_unexpected_tensor_is_named(tmp_path):
  model = make_hf_model("qwen2_untied_bias")
  save_hf_model(model, tmp_path)
  from safetensors.torch import save_file
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
  save_file(state, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"unexpected.*extra\.weight"):
    load_hf(str(tmp_path))


def test_bias_free_qwen2_exports_with_zero_biases(tmp_path):
  """transformers' Qwen2 always has q/k/v biases: a bias-free cftjax qwen2 model must still load exactly."""
  from cftjax.models import init_params
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, attention_bias=False)
  params = init_params(cfg, jax.random.key(1))
  save_hf(cfg, params, str(tmp_path))
  reloaded, info = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  tokens = _tokens(cfg.vocab_size, 2, 16)
  ours = np.asarray(Decoder(cfg).apply({"params": params}, tokens))
  np.testing.assert_allclose(hf_logits(reloaded.eval(), tokens), ours, atol=1e-4)
