"""`cftjax compile` / `cftjax.aot`: the CFT step, the GRPO update and the sampler of a tiny model
compiled ahead of time for a TPU v5e:2x2 topology (libtpu, no TPU), and the CI guards on their
optimised HLO: no all-reduce of a full-vocabulary array, the LM head gathered at most twice a step.

Also on CPU: `ModelConfig.unroll_loops` (the straight-line program the cost figures come from) gives
the same loss and gradients as the scanned program.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cftjax import aot, cli, hlo, parallel, sampling
from cftjax.config import ConfigError, base_config
from cftjax.models import ModelConfig
from cftjax.train import cft
from cftjax.train import state as state_lib

TOPOLOGY = "v5e:2x2"
VOCAB, HIDDEN = 1000, 128
MAX_HEAD_GATHERS = 2  # per step: once for the forward, once for the backward at most


def tiny_config(objective: str = "cft"):
  c = base_config()
  c.train.objective = objective
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.model.arch.update(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=256)
  c.data.batch_size, c.data.max_seq_len = 8, 128
  c.train.chunk_size = 64  # tokens per device: 4 CE chunks of 2 rows x 32 positions under FSDP 4
  c.rl.group_size, c.rl.max_prompt_len, c.rl.max_new_tokens = 4, 48, 16
  c.data.sources = ()
  return c


@pytest.fixture(scope="module")
def devices():
  return aot.topology_devices(TOPOLOGY)


@pytest.fixture(scope="module")
def programs(devices):
  """{objective: (report, optimised HLO text)} of the real programs (no cost compiles)."""
  found = {}
  for objective in aot.OBJECTIVES:
    config = tiny_config("grpo" if objective != "cft" else "cft")
    if objective != "cft":
      config.data.batch_size = 2  # x group_size 4 = 8 rows
    found[objective] = aot.compile_objective(config, aot.model_config(config), objective, devices, TOPOLOGY,
                                             cost=False)
  return found


@pytest.fixture(scope="module")
def compiled(programs):
  """{objective: report} of the real programs."""
  return {objective: report for objective, (report, _) in programs.items()}


def test_a_grpo_update_holds_critique_grpos_refinement_rows_too():
  """Critique-GRPO adds rl.refinement.num_refinements rows to each group of rl.group_size."""
  config = tiny_config("grpo")
  config.data.batch_size, config.rl.mini_batches = 6, 2
  assert aot.grpo_update_shape(config) == (6 * 4 // 2, 64)
  config.rl.refinement.when, config.rl.refinement.num_refinements = "always", 2
  assert aot.grpo_update_shape(config) == (6 * (4 + 2) // 2, 64)
  config.data.batch_size = 5  # 5 x 6 = 30 rows do not split into 4 mini-batches
  config.rl.mini_batches = 4
  with pytest.raises(ConfigError, match=r"\(rl.group_size \+ refinements\) = 30 rows"):
    aot.grpo_update_shape(config)


def test_topology_gives_the_slice_devices(devices):
  assert len(devices) == 4 and all(d.platform == "tpu" for d in devices)
  assert len(aot.topology_devices("v5p:2x2x2")) == 8  # two hosts of four chips
  assert len(aot.topology_devices("v4:2x2x4")) == 16  # one device per chip (megacore), four hosts


@pytest.mark.parametrize("objective", aot.OBJECTIVES)
def test_the_real_programs_compile_for_tpu_and_fit(compiled, objective):
  report = compiled[objective]
  assert report.device_kind.startswith("TPU v5")
  assert report.fits and 0 < report.memory["total"] < 1 * aot.GiB
  assert report.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
  assert report.collectives["all-gather"].count >= 2  # FSDP gathers the layer weights


@pytest.mark.parametrize("objective", aot.OBJECTIVES)
def test_the_training_steps_get_a_per_op_estimate_from_the_real_program(compiled, objective):
  """No cost compiles ran: the per-op estimate (the real program's ops in their schedule) still gives a
  step time and an MFU below 1 for the CFT and GRPO steps; the sampler's decode loop has no trip
  count, so it gets none."""
  report = compiled[objective]
  if objective == "generate":
    assert report.per_op_seconds is None
    return
  assert report.per_op_seconds > report.pallas_seconds > 0
  assert 0 < report.per_op_mfu < 1
  assert report.to_json()["per_op_step_seconds"] == report.per_op_seconds
  assert "per-op estimate" in aot.format_report(report)


def test_lora_programs_on_an_nf4_base_compile_with_less_argument_memory(compiled, devices):
  """LoRA rank 8 on an nf4 base: the CFT step (the frozen base passed beside the adapters-only state,
  as the GRPO update takes it too) and the sampler (adapters joined to the packed base) compile for
  TPU, each with fewer argument bytes per chip than the full fine-tune's program."""
  for objective in ("cft", "generate"):
    config = tiny_config("grpo" if objective != "cft" else "cft")
    if objective != "cft":
      config.data.batch_size = 2
    config.model.lora.rank, config.model.lora.quantize_base = 8, "nf4"
    report = aot.compile_objective(config, aot.model_config(config), objective, devices, TOPOLOGY, cost=False)[0]
    assert report.fits, objective
    assert report.memory["argument"] < compiled[objective].memory["argument"], objective


@pytest.mark.parametrize("objective", aot.OBJECTIVES)
def test_no_full_vocab_array_is_all_reduced(compiled, objective):
  assert compiled[objective].full_vocab_all_reduces == 0


def test_the_head_gradient_leaves_as_one_all_to_all_of_the_whole_gradient(programs):
  """The head gradient [hidden, vocab] goes back to its FSDP shards as one all-to-all a step of its
  4 pieces [4, hidden / 4, vocab] (then summed on the receiving chip), not as an all-reduce."""
  head = [c for c in hlo.collectives(programs["cft"][1]) if c.kind == "all-to-all"
          and any(a.shape == (4, HIDDEN // 4, VOCAB) for a in c.arrays)]
  assert sum(c.runs for c in head) == 1
  assert head[0].bytes == HIDDEN * VOCAB * 2


@pytest.mark.parametrize("chunk_size", [64, 256])
def test_no_full_vocab_array_is_all_reduced_on_v5p_2x2x2(chunk_size):
  """On v5p:2x2x2 the TPU compiler rewrites a psum_scatter of the head gradient as a whole-head
  all-reduce and a slice; the all-to-all reduce-scatter it gets instead stays one. Both CE paths:
  4 chunks (the custom VJP) and one chunk per device (plain autodiff through the gather)."""
  config = tiny_config("cft")
  config.train.chunk_size = chunk_size
  report = aot.compile_objective(config, aot.model_config(config), "cft", aot.topology_devices("v5p:2x2x2"),
                                 "v5p:2x2x2", cost=False)[0]
  assert report.full_vocab_all_reduces == 0


@pytest.mark.parametrize("objective", ("cft", "grpo"))
def test_the_lm_head_is_gathered_at_most_twice_per_step(compiled, objective):
  assert compiled[objective].lm_head_gathers <= MAX_HEAD_GATHERS


def test_the_sampler_gathers_the_lm_head_at_most_twice_per_call(compiled):
  assert compiled["generate"].lm_head_gathers <= MAX_HEAD_GATHERS


def test_generate_estimates_one_decode_step_from_its_optimised_loop_body(devices):
  """The sampler's decode step per chip comes from the real program's decode loop body (no cost
  compiles needed): positive HBM traffic and a positive time estimate, the compiler's priced part
  within it; the call's loop-corrected cost is prefill + (max_new_tokens - 1) steps of the cost
  model, at least max_new_tokens - 1 times the roofline."""
  config = tiny_config("grpo")
  config.data.batch_size = 2
  config.mesh.fsdp, config.mesh.tensor = 1, 4
  report = aot.compile_objective(config, aot.model_config(config), "generate", devices, TOPOLOGY)[0]
  step = report.decode_step
  assert report.decode_roofline_bytes > 0 and step["bytes"] > 0
  assert 0 < step["priced_seconds"] <= step["seconds"] <= step["serial_seconds"] * (1 + 1e-9)  # float sums
  assert step["serial_seconds"] == pytest.approx(step["priced_seconds"] + step["unpriced_bytes"] / 819e9)
  assert report.hbm_traffic > (config.rl.max_new_tokens - 1) * report.decode_roofline_bytes
  line = aot.format_report(report)
  assert "one decode step per chip" in line and "x the roofline" in line
  assert report.to_json()["decode_step_estimated_seconds"] == step["seconds"]


def test_the_decode_loop_does_not_re_lay_the_norm_scales_in_every_step(devices):
  """At Qwen2.5-7B's width (3584) the TPU compiler, given the norm scales as slices of the stacked
  params, keeps each [1, hidden] slice in the decode loop and turns it into [hidden] with a reduce in
  every step (1.4 us each on v5e, 2 a layer); `decoder.decode_weights` materialises them once per call."""
  config = tiny_config("grpo")
  config.data.batch_size = 2
  config.model.arch.update(hidden_size=3584, num_heads=28, num_kv_heads=4, head_dim=128, num_layers=1)
  config.mesh.fsdp, config.mesh.tensor = 1, 4
  _, text = aot.compile_objective(config, aot.model_config(config), "generate", devices, TOPOLOGY, cost=False)
  module = hlo.parse(text)
  body = module.computations[hlo.while_body(module, sampling.DECODE_LOOP_SCOPE)]
  assert [i.name for i in body if i.opcode == "reduce" and i.result[0].shape == (3584,)] == []


def _entry_hbm_bytes(compiled) -> int:
  module = hlo.parse(compiled.as_text())
  return sum(nbytes for _, nbytes in hlo.hbm_bytes(module, module.entry))


def test_hbm_bytes_of_a_matmul_are_its_operands_and_result(devices):
  """x [64, 4096] @ w [4096, 8192] bf16 on one TPU chip: the census reads x and w once and writes the
  product once (bytes that do not depend on how the compiler tiles it)."""
  sharding = jax.NamedSharding(jax.sharding.Mesh(np.array(devices[:1]), ("x",)), jax.P())
  x = jax.ShapeDtypeStruct((64, 4096), jnp.bfloat16, sharding=sharding)
  w = jax.ShapeDtypeStruct((4096, 8192), jnp.bfloat16, sharding=sharding)
  compiled = jax.jit(lambda x, w: x @ w).lower(x, w).compile()
  assert _entry_hbm_bytes(compiled) == 2 * (64 * 4096 + 4096 * 8192 + 64 * 8192)


def test_hbm_bytes_count_an_in_place_cache_update_at_its_slice(devices):
  """A donated KV cache [64, 4, 1024, 128] bf16 updated at a traced slot with one token's k
  [64, 4, 1, 128]: in place, so the census moves the update (read from HBM, written into the cache;
  the compiler stages it through VMEM) and a few scalar bytes of the slot, not the cache."""
  sharding = jax.NamedSharding(jax.sharding.Mesh(np.array(devices[:1]), ("x",)), jax.P())
  cache = jax.ShapeDtypeStruct((64, 4, 1024, 128), jnp.bfloat16, sharding=sharding)
  new = jax.ShapeDtypeStruct((64, 4, 1, 128), jnp.bfloat16, sharding=sharding)
  slot = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)
  write = jax.jit(lambda c, k, s: jax.lax.dynamic_update_slice_in_dim(c, k, s, 2), donate_argnums=0)
  moved = _entry_hbm_bytes(write.lower(cache, new, slot).compile())
  assert 2 * 64 * 4 * 128 * 2 <= moved <= 2 * 64 * 4 * 128 * 2 + 64


def test_the_cost_model_prices_an_update_of_a_fresh_cache_at_minus_one_second(devices):
  """The caveat `aot.NEGATIVE_COST` rests on: a prefill-sized write into a zero-initialised KV cache
  buffer at a traced slot (k [64, 512, 4, 128] bf16 into [64, 4, 1024, 128], tensor 4), one fusion,
  is priced -1 s."""
  mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 4), ("fsdp", "tensor"))
  new = jax.ShapeDtypeStruct((64, 512, 4, 128), jnp.bfloat16,
                             sharding=jax.NamedSharding(mesh, jax.P(None, None, "tensor")))
  start = jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.NamedSharding(mesh, jax.P()))
  write = lambda k, slot: jax.lax.dynamic_update_slice_in_dim(jnp.zeros((64, 4, 1024, 128), k.dtype),
                                                              k.swapaxes(1, 2), slot, 2)
  seconds = aot._cost(jax.jit(write).lower(new, start).compile())["seconds"]
  assert -1.0 <= seconds < -0.99


def test_a_negative_cost_model_time_gives_no_estimate(compiled):
  report = dataclasses.replace(compiled["cft"], cost_model_seconds=-0.97, flops=1e12, hbm_traffic=1e9)
  assert report.estimated_seconds is None and report.estimated_mfu is None
  assert report.to_json()["estimated_step_seconds"] is None
  assert aot.NEGATIVE_COST in aot.format_report(report)


def test_sweep_remat_compiles_every_policy_and_names_the_fastest_that_fits(hf_config, capsys):
  code = cli.main(["compile", "--config", "configs/demo_cft.py", "--topology", TOPOLOGY, "--model-config",
                   str(hf_config), "--json", "--sweep-remat", "--config.model.dtype=bfloat16",
                   "--config.train.chunk_size=2048"])
  result = json.loads(capsys.readouterr().out)
  assert code == 0
  sweep = {r["remat"]: r for r in result["remat_sweep"]}
  assert sorted(sweep) == ["full", "minimal", "none"]
  fastest = min(sweep.values(), key=lambda r: r["estimated_step_seconds"])
  assert result["best_remat"] == fastest["remat"] and result["remat"] == fastest["remat"]
  assert all(r["fits"] and r["estimated_step_seconds"] > 0 for r in sweep.values())


def test_a_sweep_ranks_by_one_estimate_that_covers_every_fitting_policy(compiled):
  """The cost model's estimate when every fitting policy has one; else the per-op one (no cost
  compiles, or a negative cost-model time as on v5e); never one policy by one and another by the
  other; with neither, it says so."""
  base = compiled["cft"]
  costed = lambda remat, cost, per_op: dataclasses.replace(base, remat=remat, cost_model_seconds=cost,
                                                            pallas_seconds=0.0, per_op_seconds=per_op)
  minimal, full = costed("minimal", 2.0, 1.0), costed("full", 1.5, 3.0)
  assert aot.best_remat([minimal, full]).remat == "full"  # by the cost model
  negative = dataclasses.replace(full, cost_model_seconds=-2.0)
  assert aot.best_remat([minimal, negative]).remat == "minimal"  # by the per-op estimate, for both
  assert "per-op estimate" in aot.sweep_verdict([minimal, negative])
  neither = dataclasses.replace(negative, per_op_seconds=None)
  assert aot.best_remat([neither]) is None
  assert "no step time ranks them" in aot.sweep_verdict([neither])


@pytest.mark.slow
@pytest.mark.parametrize("layers,micro_batches", [(4, 1), (3, 4)])
def test_loop_corrected_cost_equals_the_fully_unrolled_program(devices, layers, micro_batches):
  """C(1) + (L - 1)(C(2) - C(1)) against a straight-line compile of all L layers; with M > 1
  micro-batches, bilinear in layers and micro-batches from 1-2 of each, against the whole step
  written out straight."""
  config = tiny_config()
  config.model.arch.num_layers = layers
  config.data.batch_size, config.train.micro_batches = 4 * micro_batches, micro_batches
  model_cfg = aot.model_config(config)
  mesh = parallel.make_mesh(config.mesh, devices=devices)
  with parallel.use_mesh(mesh):
    corrected = aot.loop_corrected_cost(config, model_cfg, "cft")
    program = aot.cft_program(config, model_cfg.replace(unroll_loops=True))
    unrolled = aot._cost(aot._compile(program, aot.LOOP_FREE_COMPILER_OPTIONS))
    scanned = aot._cost(aot._compile(aot.cft_program(config, model_cfg)))
  assert corrected["seconds"] > 0  # the CE backward has no scatter-add, which the cost model prices < 0
  assert corrected["flops"] == pytest.approx(unrolled["flops"], rel=0.01)
  assert corrected["bytes"] == pytest.approx(unrolled["bytes"], rel=0.05)
  assert scanned["flops"] < 0.6 * unrolled["flops"]  # the scanned program's loop bodies counted once


@pytest.fixture
def hf_config(tmp_path):
  """A tiny Qwen2 config.json for --model-config."""
  hf = tmp_path / "config.json"
  hf.write_text(json.dumps({"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": HIDDEN,
                            "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "max_position_embeddings": 256}))
  return hf


def test_compile_command_prints_json(hf_config, capsys):
  hf = hf_config
  code = cli.main(["compile", "--config", "configs/demo_cft.py", "--topology", TOPOLOGY, "--model-config",
                   str(hf), "--json", "--config.model.dtype=bfloat16", "--config.train.chunk_size=2048"])
  result = json.loads(capsys.readouterr().out)
  assert code == 0
  assert result["fits"] is True and result["hbm_gib_per_chip"] == 16
  assert 0 < result["memory_gib_per_chip"] < 1
  assert result["estimated_step_seconds"] > 0 and 0 < result["estimated_mfu"] < 1
  assert result["collective_gib_per_step"] > 0 and result["shapes"].startswith("16 x 128 tokens")


def test_no_cost_reports_no_estimates(hf_config, capsys):
  """--no-cost compiles the real program only: memory and collectives, and null cost figures, never
  a step time made of the Pallas part alone."""
  code = cli.main(["compile", "--config", "configs/demo_cft.py", "--topology", TOPOLOGY, "--no-cost", "--json",
                   "--model-config", str(hf_config), "--config.model.dtype=bfloat16",
                   "--config.model.attention=splash"])
  result = json.loads(capsys.readouterr().out)
  assert code == 0 and result["pallas_calls"] > 0 and result["memory_gib_per_chip"] > 0
  for key in ("tflops_per_chip", "hbm_traffic_gb_per_chip", "cost_model_seconds", "estimated_step_seconds",
              "estimated_mfu"):
    assert result[key] is None, key


@pytest.mark.slow
def test_compile_command_fails_naming_what_to_change_when_the_step_does_not_fit(capsys):
  """64 rows of 8192 tokens through 2 layers of hidden 2048 without remat: the saved activations
  (~20 GiB per chip) exceed a v5e chip's 16 GiB; nothing is estimated for a program that does not
  fit (no cost compiles)."""
  code = cli.main(["compile", "--config", "configs/demo_cft.py", "--topology", TOPOLOGY,
                   "--config.model.arch.vocab_size=1000", "--config.model.arch.max_position_embeddings=8192",
                   "--config.model.arch.hidden_size=2048", "--config.model.arch.intermediate_size=8192",
                   "--config.model.arch.num_layers=2", "--config.model.arch.num_heads=16",
                   "--config.model.arch.num_kv_heads=16", "--config.model.arch.head_dim=128",
                   "--config.data.max_seq_len=8192", "--config.data.batch_size=64", "--config.model.remat=none"])
  captured = capsys.readouterr()
  assert code == 3
  assert "DOES NOT FIT" in captured.out and "16 GiB of HBM" in captured.err
  assert "cost: not estimated (the program" in captured.out
  for fix in ("model.remat=full", "train.micro_batches", "mesh.fsdp"):
    assert fix in captured.err


def test_unknown_topology_is_a_one_line_error(capsys):
  assert cli.main(["compile", "--config", "configs/demo_cft.py", "--topology", "v9x:2x2"]) == 1
  assert "unknown TPU generation 'v9x'" in capsys.readouterr().err


def test_unrolled_loops_give_the_scanned_programs_loss_and_gradients():
  """On CPU: layers, CE chunks and micro-batches written out straight give the same step."""
  cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                    num_kv_heads=2, head_dim=8, remat="full", attention="xla")
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 97, (4, 24)), "targets": rng.integers(0, 97, (4, 24)),
           "loss_mask": (rng.random((4, 24)) < 0.8).astype(np.float32),
           "positions": np.tile(np.arange(24), (4, 1)), "segment_ids": np.ones((4, 24), np.int32)}
  batch = {k: jnp.asarray(v, jnp.float32 if k == "loss_mask" else jnp.int32) for k, v in batch.items()}
  results = []
  with parallel.use_mesh(parallel.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])):
    for unroll in (False, True):
      model_cfg = cfg.replace(unroll_loops=unroll)
      state = state_lib.create_train_state(model_cfg, optax.sgd(0.0), jax.random.key(0))
      grads, sums = jax.jit(lambda p, b, c=model_cfg: cft.cft_grad_sums(c, p, b, micro_batches=2, chunk_size=16))(
          state.params, batch)
      results.append((grads, sums))
  (grads0, sums0), (grads1, sums1) = results
  np.testing.assert_allclose(sums1["loss_sum"], sums0["loss_sum"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads1, grads0)
