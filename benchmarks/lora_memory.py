"""Memory of the CFT step for a 7B model (Qwen2.5-7B shape): full fine-tune vs LoRA vs QLoRA (int8
and nf4 bases), from the compiled program's memory analysis. Nothing is allocated: the train state, the frozen
base and the batch are ShapeDtypeStructs carrying their shardings, and the real jitted step
(`cftjax.train.cft.make_cft_step`) is compiled ahead of time.

Reported per device: params (the trained master params + a LoRA run's frozen base), optimizer state
(from the abstract train state), and what the compiler adds (temp = activations and other scratch,
the largest part of which is the saved activations) and the total it reports.

  python benchmarks/lora_memory.py                       # CPU, one device
  TPU_ACCELERATOR_TYPE=x ALLOW_MULTIPLE_LIBTPU_LOAD=1 PYTHONPATH=$PWD /tmp/tpuvenv/bin/python \\
      benchmarks/lora_memory.py --topology v5e:2x2       # TPU chips, FSDP over them
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from cftjax import parallel
from cftjax.config import base_config
from cftjax.models import ModelConfig
from cftjax.train import cft, losses
from cftjax.train import state as state_lib

GiB = 1024**3


def qwen25_7b(**overrides) -> ModelConfig:
  fields = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                num_kv_heads=4, head_dim=128, model_type="qwen2", rope_theta=1e6, attention_bias=True,
                dtype="bfloat16", param_dtype="bfloat16", remat="full")
  fields.update(overrides)
  return ModelConfig(**fields)


def nbytes(tree) -> int:
  """Bytes per device of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shard)) * jnp.dtype(x.dtype).itemsize
  return total


def measure(cfg: ModelConfig, batch: int, seq: int, chunk: int) -> dict:
  optim = base_config().optim
  optim.lr = 1e-4
  tx, schedule = state_lib.make_optimizer(optim, total_steps=100)
  state = state_lib.abstract_train_state(cfg, tx, seed=0)
  frozen = state_lib.abstract_frozen_base(cfg)
  sharding = parallel.batch_sharding()
  batch_arrays = {k: jax.ShapeDtypeStruct((batch, seq), jnp.float32 if k == "loss_mask" else jnp.int32,
                                          sharding=sharding) for k in losses.CFT_BATCH_KEYS}
  step = cft.make_cft_step(cfg, tx, chunk_size=chunk, compute_dtype=cfg.dtype, schedule=schedule)
  started = time.time()
  compiled = step.lower(state, batch_arrays, frozen).compile()
  analysis = compiled.memory_analysis()
  return {
      "trained_params_GiB": nbytes(state.params) / GiB,
      "frozen_base_GiB": (nbytes(frozen) if frozen is not None else 0) / GiB,
      "optimizer_state_GiB": nbytes(state.opt_state) / GiB,
      "arguments_GiB": analysis.argument_size_in_bytes / GiB,
      "temp_GiB": analysis.temp_size_in_bytes / GiB,
      "total_GiB": (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                    - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes) / GiB,
      "compile_s": time.time() - started,
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--topology", default="", help="a TPU topology (e.g. v5e:2x2); default: this host's CPU")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--chunk", type=int, default=1024)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--variants", default="full,lora,qlora,qlora_nf4")
  args = parser.parse_args()
  if args.topology:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    devices = list(topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices)
  else:
    devices = jax.devices()[:1]
  variants = {
      "full": qwen25_7b(),  # bf16 compute over float32 master params, AdamW on all of them
      "lora": qwen25_7b(lora_rank=args.rank, lora_alpha=2.0 * args.rank),  # bf16 base, all 7 targets
      "qlora": qwen25_7b(lora_rank=args.rank, lora_alpha=2.0 * args.rank, quantize_base="int8"),
      "qlora_nf4": qwen25_7b(lora_rank=args.rank, lora_alpha=2.0 * args.rank, quantize_base="nf4"),
  }
  mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
  print(f"{len(devices)} x {devices[0].device_kind}; batch {args.batch} x {args.seq} tokens", flush=True)
  with parallel.use_mesh(mesh):
    for name in args.variants.split(","):
      result = measure(variants[name], args.batch, args.seq, args.chunk)
      print(json.dumps({"variant": name, **{k: round(v, 3) for k, v in result.items()}}), flush=True)


if __name__ == "__main__":
  main()
