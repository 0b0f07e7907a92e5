"""Ahead-of-time compiles of a run's steps for a TPU topology, on any host: libtpu compiles for the
topology's devices (`jax.experimental.topologies`), the inputs are `jax.ShapeDtypeStruct`s carrying
the run's shardings, so no TPU and no weights are needed. `cftjax compile` prints the report.

What the TPU compiler reports, and how it is corrected:
- memory per chip (`memory_analysis`) of the real program, against the chip's HBM;
- flops, HBM bytes and the cost model's step time (`cost_analysis`) count each while-loop body once,
  so they come from loop-free compiles (`ModelConfig.unroll_loops`, windowed einsum off) of a 1- and
  a 2-layer model of the same shapes: total = C(1) + (layers - 1) x (C(2) - C(1)), and likewise
  over 1 and 2 micro-batches for a step with more (bilinear in both); for the sampler,
  whose decode loop has no trip count, a call = C(one new token, no loop) + (new tokens - 1) x
  (C(with the loop) - C(one new token));
- one decode step of the sampler is estimated from the real program's decode loop body instead
  (`decode_step_estimate`: HBM traffic by op census, the compiler's per-op cycle estimates in its
  schedule),
  against the step's HBM roofline (`decode_roofline_bytes`);
- Pallas kernels (`tpu_custom_call`) report no cost: when the program has any, the attention
  FLOPs are added at the chip's MXU peak;
- collectives come from the real program's optimised HLO, weighted by while-loop trip counts
  (`cftjax.hlo`); the cost model charges them at HBM speed, not interconnect speed.
MFU = model FLOPs (6 N tokens + attention, PaLM convention) / (estimated seconds x chips x peak).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import importlib.util

import jax
from jax.experimental import topologies
import jax.numpy as jnp

from cftjax import hlo, parallel, sampling
from cftjax.config import ConfigError
from cftjax.models import ModelConfig, abstract_params, attention, checkpoint_io
from cftjax.train import cft, grpo, losses
from cftjax.train import refinement as refinement_lib
from cftjax.train import run as run_lib
from cftjax.train import state as state_lib

GiB = 1024**3
OBJECTIVES = ("cft", "grpo", "generate")
# Windowed einsum turns an all-gather + matmul into a loop the cost model would count once.
LOOP_FREE_COMPILER_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                              "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures of a TPU generation: bf16 peak FLOP/s, HBM bytes, HBM bytes/s, and the
  TensorCore clock in Hz (peak = MXUs x 128 x 128 x 2 x clock; None where not published)."""

  name: str
  peak_flops: float
  hbm_bytes: float
  hbm_bandwidth: float
  clock_hz: float | None


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GiB, 1228e9, 1.05e9),
    "v5e": Chip("TPU v5e", 197e12, 16 * GiB, 819e9, 1.5e9),
    "v5p": Chip("TPU v5p", 459e12, 95 * GiB, 2765e9, 1.75e9),
    "v6e": Chip("TPU v6e", 918e12, 32 * GiB, 1640e9, None),
}


class CompileError(ValueError):
  """A topology, libtpu or shape problem that stops an ahead-of-time compile (message says the fix)."""


def chip(topology: str) -> Chip:
  """The chip of a topology name such as "v5p:2x2x2" (generation before the colon)."""
  generation = topology.split(":", 1)[0].lower()
  if generation not in CHIPS:
    raise CompileError(f"--topology {topology!r}: unknown TPU generation {generation!r}; use one of "
                       f"{sorted(CHIPS)} followed by a shape, e.g. v5p:2x2x2, v5e:4x4, v4:2x2x4, v6e:2x2")
  return CHIPS[generation]


def topology_devices(topology: str) -> list[jax.Device]:
  """The TPU devices of `topology` (all hosts of a multi-host slice), for compiling only."""
  chip(topology)
  # Off a TPU VM libtpu needs some accelerator type; compiling opens no chip, so it need not hold
  # libtpu's one-process lock.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology)
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if importlib.util.find_spec("libtpu") is None:
    raise CompileError("libtpu is not installed: `pip install 'cftjax[tpu-compile]'` (the libtpu "
                       f"that jax {jax.__version__}'s tpu extra pins)")
  # A v4 chip's two TensorCores run as one device ("megacore"), as JAX presents them on a v4 VM.
  chip_config = {"chip_config_name": "megacore"} if topology.startswith("v4:") else {}
  try:
    description = topologies.get_topology_desc(platform="tpu", topology_name=topology, **chip_config)
  except Exception as e:  # pylint: disable=broad-except
    raise CompileError(f"--topology {topology!r}: libtpu cannot build it ({' '.join(str(e).split())[:300]}); "
                       "use GENERATION:SHAPE such as v5p:2x2x2, v5e:4x4, v4:2x2x4") from None
  return list(description.devices)


# ------------------------------------------------------------------------------------------------
# The programs: the trainers' own steps over abstract inputs.


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted function and the abstract arguments to lower it with, plus what one call does."""

  jitted: Callable
  args: tuple[Any, ...]
  model_flops: float  # model FLOPs of one call (PaLM convention)
  shapes: str  # the call's shapes in words


def _abstract_state(model_cfg: ModelConfig, tx: Any) -> state_lib.TrainState:
  return state_lib.abstract_train_state(model_cfg, tx, seed=0)


def _token_batch(keys: Sequence[str], rows: int, seq: int, float_keys: Sequence[str]) -> dict[str, Any]:
  sharding = parallel.batch_sharding()
  return {key: jax.ShapeDtypeStruct((rows, seq), jnp.float32 if key in float_keys else jnp.int32,
                                    sharding=sharding) for key in keys}


def cft_program(config: Any, model_cfg: ModelConfig) -> Program:
  """The CFT step of `cftjax.train.cft` on a batch [data.batch_size, data.max_seq_len]."""
  rows, seq = config.data.batch_size, config.data.max_seq_len
  parallel.check_batch_divisible(rows, config.train.micro_batches, "data.batch_size")
  tx, schedule = state_lib.make_optimizer(config.optim, 100)
  step = cft.make_cft_step(model_cfg, tx, micro_batches=config.train.micro_batches,
                           chunk_size=config.train.chunk_size, z_loss_weight=config.train.z_loss_weight,
                           compute_dtype=config.model.dtype, schedule=schedule)
  batch = _token_batch(losses.CFT_BATCH_KEYS, rows, seq, ("loss_mask",))
  tokens = rows * seq
  return Program(step, (_abstract_state(model_cfg, tx), batch, state_lib.abstract_frozen_base(model_cfg)),
                 run_lib.train_flops_per_token(model_cfg, seq) * tokens,
                 f"{rows} x {seq} tokens, {config.train.micro_batches} micro-batch(es)")


def grpo_update_shape(config: Any) -> tuple[int, int]:
  """(rows, seq) of one GRPO update: data.batch_size x (rl.group_size + Critique-GRPO's refinements)
  rows split into rl.mini_batches, padded to the seq bucket of max_prompt_len + max_new_tokens (a
  refinement prompt is held to max_prompt_len too)."""
  rl = config.rl
  rows = config.data.batch_size * refinement_lib.rows_per_group(rl)
  if rows % rl.mini_batches:
    raise ConfigError(f"data.batch_size x (rl.group_size + refinements) = {rows} rows do not split into "
                      f"rl.mini_batches={rl.mini_batches}; change one of them")
  seq = sampling.bucket_length(rl.max_prompt_len + rl.max_new_tokens, tuple(rl.seq_buckets) or None)
  return rows // rl.mini_batches, seq


def grpo_program(config: Any, model_cfg: ModelConfig) -> Program:
  """One GRPO update of `cftjax.train.grpo` (`grpo_update_shape`)."""
  rows, seq = grpo_update_shape(config)
  parallel.check_batch_divisible(rows, config.train.micro_batches, "GRPO update rows")
  tx, schedule = state_lib.make_optimizer(config.optim, 100)
  step = grpo.make_grpo_step(model_cfg, tx, rl=config.rl, micro_batches=config.train.micro_batches,
                             chunk_size=config.train.chunk_size, compute_dtype=config.model.dtype,
                             schedule=schedule)
  keys = grpo.batch_keys(config.rl)
  batch = _token_batch(keys, rows, seq, [k for k in keys if k not in grpo.SCORE_KEYS or k == "completion_mask"])
  tokens = rows * seq
  return Program(step, (_abstract_state(model_cfg, tx), batch, state_lib.abstract_frozen_base(model_cfg)),
                 run_lib.train_flops_per_token(model_cfg, seq) * tokens,
                 f"{rows} x {seq} tokens, {config.train.micro_batches} micro-batch(es)")


def _generation_shape(config: Any) -> tuple[int, int]:
  """(rows, prompt bucket) of one GRPO rollout call."""
  rl = config.rl
  rows = rl.generation_batch_size or config.data.batch_size * rl.group_size
  return rows, sampling.bucket_length(rl.max_prompt_len, tuple(rl.prompt_buckets) or None)


def generate_program(config: Any, model_cfg: ModelConfig) -> Program:
  """`cftjax.sampling`'s prefill + decode loop for the GRPO rollouts of `config.rl`, on the float32
  master params in their training shardings (what a GRPO run passes; a LoRA run: its adapters joined
  to the frozen base)."""
  rl = config.rl
  rows, bucket = _generation_shape(config)
  parallel.check_batch_divisible(rows, 1, "rl.generation_batch_size (or data.batch_size x rl.group_size)")
  eos = model_cfg.eos_token_id
  stop_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
  run = sampling.generation_program(model_cfg, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                                    top_k=rl.top_k, top_p=rl.top_p, stop_ids=stop_ids,
                                    cache_dtype=rl.cache_dtype, pad_id=0, mesh=parallel.current()[0],
                                    rules=parallel.current()[1])
  params = parallel.with_shardings(state_lib.abstract_master_params(model_cfg), state_lib.grad_shardings(model_cfg))
  params = state_lib.model_params(params, state_lib.abstract_frozen_base(model_cfg))
  row_sharding = parallel.batch_sharding(1)
  args = (params, jax.ShapeDtypeStruct((rows, bucket), jnp.int32, sharding=parallel.batch_sharding()),
          jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=row_sharding),
          jax.eval_shape(lambda: jax.random.key(0)), jax.ShapeDtypeStruct((), jnp.float32),
          jax.ShapeDtypeStruct((), jnp.float32))
  args = args[:3] + tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated())
                          for a in args[3:])
  # Prefill of every row's bucket, then max_new_tokens - 1 decode steps at their mean context.
  matmul = 2.0 * run_lib.matmul_params(model_cfg)
  attention_per_slot = 4.0 * model_cfg.num_layers * model_cfg.num_heads * model_cfg.head_dim
  decode_context = bucket + rl.max_new_tokens / 2
  flops = (rows * bucket * (matmul + attention_per_slot * bucket / 2)
           + rows * (rl.max_new_tokens - 1) * (matmul + attention_per_slot * decode_context))
  return Program(run, args, flops, f"{rows} rows, prompt bucket {bucket}, {rl.max_new_tokens} new tokens")


PROGRAMS = {"cft": cft_program, "grpo": grpo_program, "generate": generate_program}


# ------------------------------------------------------------------------------------------------
# Compiling and reading the compiler's figures.


def _compile(program: Program, compiler_options: dict[str, Any] | None = None):
  lowered = program.jitted.lower(*program.args)
  return lowered.compile(compiler_options) if compiler_options else lowered.compile()


_UNITS = {"K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}
_HBM_OVERFLOW = re.compile(r"required for ([\w ]+?) \(([\d.]+)([KMGT])\) exceeds available HBM|"
                           r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm")


def _hbm_overflow(message: str) -> tuple[str, float] | None:
  """(what, bytes) from the TPU compiler's out-of-HBM error, None for any other error."""
  match = _HBM_OVERFLOW.search(message)
  if not match:
    return None
  if match.group(1):
    return match.group(1), float(match.group(2)) * _UNITS[match.group(3)]
  return "the program", float(match.group(4)) * _UNITS[match.group(5)]


def _argument_bytes(program: Program) -> float:
  """Bytes per chip of the program's arguments, from their shardings (the largest shard)."""
  total = 0.0
  for leaf in jax.tree.leaves(program.args):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize if jnp.issubdtype(leaf.dtype, jnp.number) else 0
  return total


def _memory(compiled) -> dict[str, float]:
  """Bytes per chip by kind; total = arguments + outputs - aliased + temporaries + code."""
  m = compiled.memory_analysis()
  kinds = {kind: float(getattr(m, f"{kind}_size_in_bytes", 0) or 0)
           for kind in ("argument", "output", "alias", "temp", "generated_code")}
  kinds["total"] = kinds["argument"] + kinds["output"] - kinds["alias"] + kinds["temp"] + kinds["generated_code"]
  return kinds


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else dict(cost or {})
  return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0)),
          "seconds": float(cost.get("optimal_seconds", 0.0))}


def _loop_free_extrapolated(config: Any, model_cfg: ModelConfig, objective: str) -> dict[str, float]:
  """Flops, HBM bytes and cost-model seconds per chip of one call, from loop-free compiles of a
  1- and a 2-layer model: C(1) + (layers - 1) x (C(2) - C(1)); with train.micro_batches M > 1
  also of 1 and 2 micro-batches of the same size each (`_with_micro_batches`), bilinear in both:
  the whole step written out would hold every micro-batch's temporaries at once."""
  build = PROGRAMS[objective]
  micro_batches = config.train.micro_batches if objective != "generate" else 1
  configs = {1: config}
  if micro_batches > 1:
    configs = {m: _with_micro_batches(config, objective, m) for m in (1, 2)}
    if configs[1] is None or configs[2] is None:  # the rows do not split evenly: write all of them out
      configs, micro_batches = {1: config}, 1
  costs = {}
  for layers in sorted({1, min(2, model_cfg.num_layers)}):
    cfg = model_cfg.replace(num_layers=layers, unroll_loops=True)
    for m, micro_config in configs.items():
      costs[layers, m] = _cost(_compile(build(micro_config, cfg), LOOP_FREE_COMPILER_OPTIONS))
  two_layers, two_micro = min(2, model_cfg.num_layers), max(configs)
  extra_layers, extra_micro = model_cfg.num_layers - 1, micro_batches - 1
  return {k: (costs[1, 1][k] + extra_layers * (costs[two_layers, 1][k] - costs[1, 1][k])
              + extra_micro * (costs[1, two_micro][k] - costs[1, 1][k])
              + extra_layers * extra_micro * (costs[two_layers, two_micro][k] - costs[two_layers, 1][k]
                                              - costs[1, two_micro][k] + costs[1, 1][k]))
          for k in costs[1, 1]}


def _with_micro_batches(config: Any, objective: str, micro_batches: int) -> Any | None:
  """The config with train.micro_batches = `micro_batches` of the rows each of config's micro-batches
  has (CFT: data.batch_size; GRPO: data.batch_size x rl.group_size / rl.mini_batches per update), or
  None when those rows cannot be made so."""
  config = config.copy_and_resolve_references()
  if objective == "cft":
    rows = config.data.batch_size // config.train.micro_batches * micro_batches
    config.data.batch_size = rows
  else:
    rows = grpo_update_shape(config)[0] // config.train.micro_batches * micro_batches
    total = config.data.batch_size * config.rl.group_size
    if total % rows:
      return None
    config.rl.mini_batches = total // rows
  config.train.micro_batches = micro_batches
  return config


def _with_new_tokens(config: Any, new_tokens: int) -> Any:
  config = config.copy_and_resolve_references()
  config.rl.max_new_tokens = new_tokens
  return config


def loop_corrected_cost(config: Any, model_cfg: ModelConfig, objective: str) -> dict[str, float]:
  """Flops, HBM bytes and cost-model seconds per chip of one call, from loop-free compiles
  extrapolated over layers and micro-batches (`_loop_free_extrapolated`). For "generate" the cost
  model counts the decode loop's body (one decode step, the real in-place loop) once: call = C(1 new
  token: prefill and no loop) + (rl.max_new_tokens - 1) x (C(rl.max_new_tokens) - C(1)), every row
  decoding to the limit."""
  if objective != "generate":
    return _loop_free_extrapolated(config, model_cfg, objective)
  first = _loop_free_extrapolated(_with_new_tokens(config, 1), model_cfg, objective)
  with_loop = _loop_free_extrapolated(config, model_cfg, objective)
  return {k: first[k] + (config.rl.max_new_tokens - 1) * (with_loop[k] - first[k]) for k in first}


def decode_step_estimate(hlo_text: str, chip_figures: Chip) -> dict[str, float] | None:
  """One decode step of the sampler per chip, from the real program's optimised decode loop body
  (`sampling.DECODE_LOOP_SCOPE`), without the cost model (it prices some of the step's fusions at
  -1 s, `NEGATIVE_COST`): `bytes`, its HBM traffic (`hlo.hbm_bytes`); `priced_seconds`, the TPU
  compiler's own cycle estimates of the ops it prices (`hlo.estimated_cycles`) at the chip's clock;
  `unpriced_bytes`, the HBM traffic of the ops it gives no estimate for (async weight prefetches
  into VMEM, cache updates, collectives); `seconds`, those ops in their schedule with the prefetches
  moving in the bandwidth the priced ops leave free (`hlo.scheduled_seconds`); `serial_seconds` =
  priced_seconds + unpriced_bytes at full HBM bandwidth, nothing overlapped (an upper bound). The
  times are None without a published clock. None when the program has no decode loop
  (rl.max_new_tokens = 1)."""
  module = hlo.parse(hlo_text)
  body = hlo.while_body(module, sampling.DECODE_LOOP_SCOPE)
  if body is None:
    return None
  moved = hlo.hbm_bytes(module, body)
  cycles = [hlo.estimated_cycles(instruction) for instruction, _ in moved]
  unpriced = sum(nbytes for (_, nbytes), c in zip(moved, cycles) if c is None)
  clock, bandwidth = chip_figures.clock_hz, chip_figures.hbm_bandwidth
  priced_seconds = sum(c for c in cycles if c) / clock if clock else None
  return {"bytes": float(sum(nbytes for _, nbytes in moved)), "priced_seconds": priced_seconds,
          "unpriced_bytes": float(unpriced),
          "seconds": hlo.scheduled_seconds(moved, clock, bandwidth) if clock else None,
          "serial_seconds": None if priced_seconds is None else priced_seconds + unpriced / bandwidth}


def decode_roofline_bytes(config: Any, model_cfg: ModelConfig) -> float:
  """HBM bytes per chip one decode step must read at least: the compute-dtype weights (the embedding
  table only when tied to the LM head; a lookup reads a few rows) divided over "tensor" (the sampler
  gathers them over the batch axes once per call), and the KV cache of every row for the prompt
  bucket + rl.max_new_tokens slots, as its sharding splits it."""
  rl = config.rl
  rows, bucket = _generation_shape(config)
  slots = bucket + rl.max_new_tokens
  mesh = parallel.current()[0]
  weights = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params(model_cfg)))
  if not model_cfg.tie_embeddings:
    weights -= model_cfg.vocab_size * model_cfg.hidden_size
  weight_bytes = weights * jnp.dtype(model_cfg.dtype).itemsize / mesh.shape["tensor"]
  cache_shape = (model_cfg.num_layers, rows, model_cfg.num_kv_heads, slots, model_cfg.head_dim)
  cache_shard = parallel.logical_sharding(cache_shape, ("layers", *attention.CACHE_AXES), "kv cache")
  cache_bytes = 2 * math.prod(cache_shard.shard_shape(cache_shape)) * jnp.dtype(rl.cache_dtype).itemsize
  return weight_bytes + cache_bytes


def attention_flops(model_cfg: ModelConfig, rows: int, seq: int, training: bool) -> float:
  """Causal attention FLOPs (scores and weighted sum, half the square) of `rows` x `seq` tokens:
  forward, and for training the backward (2.5 x forward) and a remat recomputation of the forward."""
  forward = 2 * 2 * rows * seq * seq / 2 * model_cfg.num_heads * model_cfg.head_dim * model_cfg.num_layers
  if not training:
    return forward
  return forward * (1.0 + 2.5 + (1.0 if model_cfg.remat != "none" else 0.0))


# Why a negative cost-model time is reported as no estimate: the TPU cost model prices a fusion it
# cannot cost at exactly -1 s (measured: a dynamic-update-slice into a zero-initialised or donated
# KV cache, the gradient of a gather), so the sum is no longer a time.
NEGATIVE_COST = "not a time (the TPU cost model prices each fusion it cannot cost at -1 s)"


@dataclasses.dataclass
class Report:
  """Per-chip figures of one objective's program on one topology."""

  objective: str
  topology: str
  devices: int
  device_kind: str
  mesh: dict[str, int]
  shapes: str
  remat: str
  attention: str
  memory: dict[str, float]  # bytes per chip by kind (see `_memory`)
  hbm_bytes: float
  hbm_bandwidth: float  # bytes/s per chip
  flops: float | None  # per chip, loop-corrected; None: the cost compiles were skipped
  hbm_traffic: float | None  # bytes accessed per chip, loop-corrected; None as flops
  cost_model_seconds: float | None  # the compiler's estimate, loop-corrected; None as flops
  pallas_calls: int  # Pallas kernel launches per call (trip-weighted)
  pallas_seconds: float  # their attention FLOPs at MXU peak (0 without Pallas kernels)
  model_flops: float  # per call, all chips
  peak_flops: float  # per chip
  collectives: dict[str, hlo.KindTotal]
  full_vocab_all_reduces: int  # executions per call
  lm_head_gathers: int  # executions per call
  decode_step: dict[str, float] | None  # generate: one decode step per chip (`decode_step_estimate`)
  decode_roofline_bytes: float  # generate: the least HBM bytes per chip a decode step reads
  compile_seconds: float
  compiler_refused: str = ""  # the TPU compiler's out-of-HBM message when it would not compile
  no_cost: str = ""  # why the cost figures are None (`_cost_unless_skipped`)
  # cft / grpo: the real program's ops in their schedule at the chip's clock and HBM bandwidth
  # (`hlo.program_seconds`) plus the Pallas part; None for generate or a chip without a clock.
  per_op_seconds: float | None = None

  @property
  def fits(self) -> bool:
    return self.memory["total"] <= self.hbm_bytes

  @property
  def estimated_seconds(self) -> float | None:
    """Cost model plus Pallas kernels at MXU peak; None when the cost compiles were skipped or the
    cost model's time is not usable (`NEGATIVE_COST`)."""
    if self.cost_model_seconds is None or self.cost_model_seconds < 0:
      return None
    return self.cost_model_seconds + self.pallas_seconds

  @property
  def estimated_mfu(self) -> float | None:
    return self._mfu(self.estimated_seconds)

  @property
  def per_op_mfu(self) -> float | None:
    return self._mfu(self.per_op_seconds)

  def _mfu(self, seconds: float | None) -> float | None:
    if not seconds:  # None, or 0 (an empty program)
      return None
    return self.model_flops / (seconds * self.devices * self.peak_flops)

  @property
  def decode_step_over_roofline_time(self) -> float | None:
    """The decode step's estimated seconds over the roofline's (its bytes at full HBM bandwidth)."""
    if not self.decode_step or self.decode_step["seconds"] is None:
      return None
    return self.decode_step["seconds"] * self.hbm_bandwidth / self.decode_roofline_bytes

  @property
  def collective_bytes(self) -> int:
    return sum(t.bytes for t in self.collectives.values())

  def to_json(self) -> dict[str, Any]:
    return {
        "objective": self.objective, "topology": self.topology, "devices": self.devices,
        "device_kind": self.device_kind, "mesh": self.mesh, "shapes": self.shapes, "remat": self.remat,
        "attention": self.attention, "fits": self.fits,
        "memory_gib_per_chip": self.memory["total"] / GiB, "hbm_gib_per_chip": self.hbm_bytes / GiB,
        "memory_gib_by_kind": {k: v / GiB for k, v in self.memory.items() if k != "total"},
        "tflops_per_chip": None if self.flops is None else self.flops / 1e12,
        "hbm_traffic_gb_per_chip": None if self.hbm_traffic is None else self.hbm_traffic / 1e9,
        "cost_model_seconds": self.cost_model_seconds, "pallas_calls": self.pallas_calls,
        "pallas_seconds": self.pallas_seconds, "estimated_step_seconds": self.estimated_seconds,
        "estimated_mfu": self.estimated_mfu, "collective_gib_per_step": self.collective_bytes / GiB,
        "collectives": {k: {"count": t.count, "gib": t.bytes / GiB, "instructions": t.instructions}
                        for k, t in self.collectives.items()},
        "full_vocab_all_reduces": self.full_vocab_all_reduces, "lm_head_gathers": self.lm_head_gathers,
        "compile_seconds": self.compile_seconds, "compiler_refused": self.compiler_refused,
        "no_cost": self.no_cost, "per_op_step_seconds": self.per_op_seconds, "per_op_mfu": self.per_op_mfu,
        **({"decode_step_gb_per_chip": self.decode_step["bytes"] / 1e9,
            "decode_roofline_gb_per_chip": self.decode_roofline_bytes / 1e9,
            "decode_step_over_roofline": self.decode_step["bytes"] / self.decode_roofline_bytes,
            "decode_step_estimated_seconds": self.decode_step["seconds"],
            "decode_step_serial_seconds": self.decode_step["serial_seconds"],
            "decode_step_seconds_over_roofline": self.decode_step_over_roofline_time}
           if self.decode_step else {}),
    }


def compile_objective(config: Any, model_cfg: ModelConfig, objective: str, devices: Sequence[jax.Device],
                      topology: str, cost: bool = True) -> tuple[Report, str]:
  """(report, optimised HLO text) of `objective`'s program for `model_cfg` on a mesh of `devices`
  by config.mesh; `cost=False` skips the loop-free compiles (cost figures and estimates then None)."""
  if objective not in PROGRAMS:
    raise ConfigError(f"objective {objective!r} is not one of {OBJECTIVES}")
  chip_figures = chip(topology)
  mesh = parallel.make_mesh(config.mesh, devices=devices)
  model_cfg = model_cfg.replace(attention=attention.resolve(model_cfg.attention, "tpu"))
  with parallel.use_mesh(mesh, parallel.logical_rules(config.mesh.rules)):
    program = PROGRAMS[objective](config, model_cfg)
    start = time.perf_counter()
    try:
      compiled = _compile(program)
    except jax.errors.JaxRuntimeError as e:
      overflow = _hbm_overflow(str(e))
      if overflow is None:
        raise
      return _refused_report(objective, topology, devices, mesh, program, model_cfg, overflow,
                             " ".join(str(e).split())[:300], time.perf_counter() - start), ""
    compile_seconds = time.perf_counter() - start
    text = compiled.as_text()
    memory = _memory(compiled)
    corrected, no_cost = _cost_unless_skipped(config, model_cfg, objective, cost,
                                              memory["total"] <= chip_figures.hbm_bytes)
    roofline = decode_roofline_bytes(config, model_cfg) if objective == "generate" else 0.0
    vocab_shards = _vocab_shards(model_cfg)
  found = hlo.collectives(text)
  pallas_calls = hlo.count_custom_calls(text, "tpu_custom_call")
  pallas_seconds = 0.0
  if pallas_calls:
    rows, seq = _rows_and_seq(program)
    pallas_seconds = attention_flops(model_cfg, rows, seq, objective != "generate") / (
        len(devices) * chip_figures.peak_flops)
  report = Report(
      objective=objective, topology=topology, devices=len(devices), device_kind=devices[0].device_kind,
      mesh=dict(mesh.shape), shapes=program.shapes, remat=model_cfg.remat, attention=model_cfg.attention,
      memory=memory, hbm_bytes=chip_figures.hbm_bytes, hbm_bandwidth=chip_figures.hbm_bandwidth,
      flops=corrected["flops"],
      hbm_traffic=corrected["bytes"], cost_model_seconds=corrected["seconds"], pallas_calls=pallas_calls,
      pallas_seconds=pallas_seconds, model_flops=program.model_flops, peak_flops=chip_figures.peak_flops,
      collectives=hlo.totals_by_kind(found),
      full_vocab_all_reduces=sum(c.runs for c in hlo.full_vocab_all_reduces(found, model_cfg.vocab_size)),
      lm_head_gathers=sum(c.runs for c in hlo.lm_head_gathers(
          found, model_cfg.hidden_size, model_cfg.vocab_size, vocab_shards, tied=model_cfg.tie_embeddings)),
      decode_step=decode_step_estimate(text, chip_figures) if objective == "generate" else None,
      decode_roofline_bytes=roofline, compile_seconds=compile_seconds, no_cost=no_cost,
      per_op_seconds=(hlo.program_seconds(text, chip_figures.clock_hz, chip_figures.hbm_bandwidth) + pallas_seconds
                      if objective != "generate" and chip_figures.clock_hz else None))
  return report, text


def _cost_unless_skipped(config: Any, model_cfg: ModelConfig, objective: str, cost: bool, fits: bool
                         ) -> tuple[dict[str, float | None], str]:
  """(loop-corrected cost, "") or (None figures, why there are none): `cost` False (--no-cost), a
  program that does not fit (nothing to estimate), or a written-out cost program the TPU compiler
  refuses for HBM (its loops unrolled, it can need far more temporaries than the real program)."""
  skipped = dict(flops=None, bytes=None, seconds=None)
  if not cost:
    return skipped, "--no-cost"
  if not fits:
    return skipped, "the program does not fit"
  try:
    return loop_corrected_cost(config, model_cfg, objective), ""
  except jax.errors.JaxRuntimeError as e:
    overflow = _hbm_overflow(str(e))
    if overflow is None:
      raise
    what, nbytes = overflow
    return skipped, (f"the written-out cost program (loops unrolled) needs {nbytes / GiB:.1f} GiB of HBM for "
                     f"{what}")


def _refused_report(objective: str, topology: str, devices: Sequence[jax.Device], mesh: Any,
                    program: Program, model_cfg: ModelConfig, overflow: tuple[str, float], message: str,
                    compile_seconds: float) -> Report:
  """A does-not-fit report from the compiler's out-of-HBM error: arguments from their shardings,
  temporaries (or the whole program) as the compiler counted them; no cost or collectives."""
  what, nbytes = overflow
  arguments = _argument_bytes(program)
  temp = nbytes if "temporar" in what else max(nbytes - arguments, 0.0)
  chip_figures = chip(topology)
  return Report(
      objective=objective, topology=topology, devices=len(devices), device_kind=devices[0].device_kind,
      mesh=dict(mesh.shape), shapes=program.shapes, remat=model_cfg.remat, attention=model_cfg.attention,
      memory={"argument": arguments, "output": 0.0, "alias": 0.0, "temp": temp, "generated_code": 0.0,
              "total": arguments + temp},
      hbm_bytes=chip_figures.hbm_bytes, hbm_bandwidth=chip_figures.hbm_bandwidth, flops=None, hbm_traffic=None, cost_model_seconds=None, pallas_calls=0,
      pallas_seconds=0.0, model_flops=program.model_flops, peak_flops=chip_figures.peak_flops, collectives={},
      full_vocab_all_reduces=0, lm_head_gathers=0, decode_step=None, decode_roofline_bytes=0.0,
      compile_seconds=compile_seconds, compiler_refused=message)


def _vocab_shards(model_cfg: ModelConfig) -> int:
  """Into how many pieces the rules split the LM head's vocab dim on the current mesh."""
  head = parallel.logical_sharding((model_cfg.hidden_size, model_cfg.vocab_size), ("embed", "vocab"), "lm_head")
  axes = head.spec[1] if len(head.spec) > 1 else None
  mesh = parallel.current()[0]
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def _rows_and_seq(program: Program) -> tuple[int, int]:
  """(rows, seq) of the program's token batch (its first [rows, seq] int32 argument)."""
  for leaf in jax.tree.leaves(program.args[1:]):
    if len(leaf.shape) == 2 and leaf.dtype == jnp.int32:
      return int(leaf.shape[0]), int(leaf.shape[1])
  raise ValueError("the program has no [rows, seq] token argument")


def advice(report: Report, config: Any) -> list[str]:
  """What to change when the program does not fit (one line each), biggest lever first."""
  memory = report.memory
  lines = []
  over = (memory["total"] - report.hbm_bytes) / GiB
  lines.append(f"{report.objective} step needs {memory['total'] / GiB:.2f} GiB per chip, "
               f"{over:.2f} GiB more than the {report.hbm_bytes / GiB:.0f} GiB of HBM of a {report.device_kind}")
  if memory["temp"] >= memory["argument"] and report.objective != "generate":
    if report.remat != "full":
      lines.append(f"set --config.model.remat=full (now {report.remat}): activations are recomputed "
                   "in the backward pass instead of kept")
    lines.append(f"raise --config.train.micro_batches (now {config.train.micro_batches}): temporaries "
                 f"({memory['temp'] / GiB:.2f} GiB) scale with the micro-batch")
  if report.objective == "generate":
    lines.append("lower --config.rl.generation_batch_size, use --config.rl.cache_dtype=bfloat16, or "
                 "shard over more chips (--config.mesh.tensor)")
  lines.append(f"shard params and optimizer state over more chips (--config.mesh.fsdp / mesh.tensor; "
               f"arguments take {memory['argument'] / GiB:.2f} GiB per chip on mesh {report.mesh}) or "
               "pick a larger --topology")
  return lines


def _sweep_estimate(reports: Sequence[Report]) -> tuple[str, Callable[[Report], float | None]] | None:
  """(name, seconds of a report) of the one estimate every fitting report has: the cost model's
  (`estimated_seconds`), else the per-op one (`per_op_seconds`, also without cost compiles and where
  the cost model's time is negative); None when neither covers them all. The two are different
  scales, so a sweep never ranks one report by one and another by the other."""
  fitting = [r for r in reports if r.fits]
  for name, seconds in (("estimated", lambda r: r.estimated_seconds), ("per-op estimate", lambda r: r.per_op_seconds)):
    if fitting and all((seconds(r) or 0) > 0 for r in fitting):
      return name, seconds
  return None


def best_remat(reports: Sequence[Report]) -> Report | None:
  """The report with the shortest step among those that fit, by `_sweep_estimate` (None if no
  estimate covers them all)."""
  estimate = _sweep_estimate(reports)
  if estimate is None:
    return None
  return min((r for r in reports if r.fits), key=estimate[1])


def sweep_verdict(reports: Sequence[Report]) -> str:
  """One line on a `--sweep-remat`: the fastest policy within memory, or why none is named."""
  chosen, estimate = best_remat(reports), _sweep_estimate(reports)
  if chosen:
    return f"best remat within memory: {chosen.remat} ({estimate[1](chosen):.4f} s, {estimate[0]})"
  fitting = [r.remat for r in reports if r.fits]
  if not fitting:
    return "no remat policy fits"
  return (f"remat {', '.join(fitting)} fit{'s' if len(fitting) == 1 else ''}, but no step time ranks them "
          "(no cost compiles and no per-op estimate for this objective or chip)")


def model_config(config: Any, hf_config: str | None = None) -> ModelConfig:
  """The run's architecture with its compute settings (`config.model`: dtype, remat, attention):
  from `hf_config` (a Hugging Face config.json) when given, else the config's checkpoint
  (model.init_from), else model.arch. Reads no weights."""
  model = config.model
  if hf_config:
    if not os.path.isfile(hf_config):
      raise FileNotFoundError(f"--model-config {hf_config}: no such file (give a Hugging Face config.json)")
    cfg = ModelConfig.from_hf_file(hf_config, param_dtype=model.param_dtype)
  elif model.init_from:
    cfg = checkpoint_io.read_model_config(model.init_from)
  elif model.arch.vocab_size is None and not model.tokenizer_dir:
    raise ConfigError("config.model.arch.vocab_size is unset (it defaults to the tokenizer's): set "
                      "--config.model.arch.vocab_size, --config.model.tokenizer_dir, or give "
                      "--model-config HF_config.json")
  elif model.arch.vocab_size is None:
    cfg = checkpoint_io.build_model(model)[0]
  else:
    cfg = ModelConfig(**model.arch.to_dict(), param_dtype=model.param_dtype)
  return checkpoint_io.with_run_settings(cfg, model)


def format_report(report: Report) -> str:
  """The report as the lines `cftjax compile` prints."""
  m = report.memory
  lines = [
      f"{report.objective} on {report.topology}: {report.devices} x {report.device_kind}, mesh {report.mesh}; "
      f"{report.shapes}; remat {report.remat}, attention {report.attention}; compiled in "
      f"{report.compile_seconds:.1f} s",
      f"memory per chip: {m['total'] / GiB:.2f} of {report.hbm_bytes / GiB:.0f} GiB HBM "
      f"({'fits' if report.fits else 'DOES NOT FIT'}): arguments {m['argument'] / GiB:.2f}, outputs "
      f"{m['output'] / GiB:.2f} (aliased {m['alias'] / GiB:.2f}), temporaries {m['temp'] / GiB:.2f}, "
      f"code {m['generated_code'] / GiB:.3f}",
  ]
  if report.compiler_refused:
    lines.append(f"the TPU compiler refused: {report.compiler_refused}")
  if report.cost_model_seconds is None:
    lines.append(f"cost: not estimated ({report.no_cost or 'the program was refused'})")
  elif report.estimated_seconds is None:
    lines.append(f"per chip per call (loop-corrected): {report.flops / 1e12:.2f} TFLOP, "
                 f"{report.hbm_traffic / 1e9:.1f} GB HBM traffic; no step estimate: "
                 f"{report.cost_model_seconds:.4f} s, {NEGATIVE_COST}")
  else:
    lines += [
        f"per chip per call (loop-corrected): {report.flops / 1e12:.2f} TFLOP, {report.hbm_traffic / 1e9:.1f} GB "
        f"HBM traffic; cost model {report.cost_model_seconds:.4f} s"
        + (f" + {report.pallas_calls} Pallas kernel calls at MXU peak {report.pallas_seconds:.4f} s"
           if report.pallas_calls else ""),
        f"estimated step {report.estimated_seconds:.4f} s, estimated MFU {report.estimated_mfu:.3f} "
        f"(model {report.model_flops / 1e12:.1f} TFLOP over {report.devices} x "
        f"{report.peak_flops / 1e12:.0f} TFLOP/s)",
    ]
  if report.per_op_seconds is not None:
    lines.append(f"per-op estimate (the real program's ops in their schedule, the compiler's cycle estimates at "
                 f"the chip's clock, interconnect time not included): {report.per_op_seconds:.4f} s, "
                 f"MFU {report.per_op_mfu:.3f}")
  if report.decode_step:
    step = report.decode_step
    lines.append(f"one decode step per chip (the optimised loop body's ops): {step['bytes'] / 1e9:.3f} GB HBM "
                 f"traffic, {step['bytes'] / report.decode_roofline_bytes:.2f} x the roofline "
                 f"{report.decode_roofline_bytes / 1e9:.3f} GB (weights + KV cache); "
                 + ("no time estimate (no published clock for this chip)" if step["seconds"] is None else
                    f"estimated {step['seconds'] * 1e3:.3f} ms = {report.decode_step_over_roofline_time:.2f} x "
                    f"the roofline's {report.decode_roofline_bytes / report.hbm_bandwidth * 1e3:.3f} ms (the "
                    f"compiler's cycle estimates {step['priced_seconds'] * 1e3:.3f} ms in its schedule, with "
                    f"{step['unpriced_bytes'] / 1e9:.3f} GB of ops it does not price moving in the HBM bandwidth "
                    f"they leave free; {step['serial_seconds'] * 1e3:.3f} ms with nothing overlapped)"))
  lines.append(f"collectives per call per chip (trip-weighted): {report.collective_bytes / GiB:.2f} GiB")
  for kind, total in report.collectives.items():
    lines.append(f"  {kind:20s} {total.count:6d} x ({total.instructions} in the HLO) {total.bytes / GiB:9.3f} GiB")
  lines.append(f"LM head all-gathers per call: {report.lm_head_gathers}; all-reduces of full-vocab arrays: "
               f"{report.full_vocab_all_reduces}")
  return "\n".join(lines)
