"""tunix's SFT step compiled ahead of time for a TPU topology (runs in the tunix-tpu environment of
benchmarks/setup.sh): the tunix model of `--model` with its own published config, bf16 compute over
float32 params, block remat, tunix's default sharding (FSDP over every chip), the default SFT loss
of `tunix.sft.peft_trainer` (full float32 logits) and optax AdamW with global-norm clipping 1.0.

tunix applies its activation sharding constraints only when `jax.devices()[0]` is not a CPU; on
this compile host it is, so the model module's `shard` is replaced by one that applies them under
the active mesh, as on a TPU VM.

  TPU_ACCELERATOR_TYPE=x $VENVS/tunix-tpu/bin/python tunix_aot.py --topology v5p:2x2x2 \\
      --model qwen2_5_7b --batch 8 --seq 4096 [--cost] [--layers N] [--hlo-out FILE]
Prints one `BENCH_RESULT {json}` line (tpu_aot_common.summary).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import time

import tpu_aot_common as common  # first: sets the libtpu environment before jax loads

import jax  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.interpreters import pxla  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.sft import peft_trainer, utils  # noqa: E402

# --model -> (tunix model module, its ModelConfig constructor, its model class).
MODELS = {
    "qwen2_5_7b": ("tunix.models.qwen2.model", "qwen2p5_7b", "Qwen2"),
    "llama3_1_8b": ("tunix.models.llama3.model", "llama3p1_8b", "Llama3"),
    "qwen3_8b": ("tunix.models.qwen3.model", "qwen3_8b", "Qwen3"),
}


def _constrain_under_mesh(x, spec):
  mesh = pxla.thread_resources.env.physical_mesh
  return x if mesh.empty else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--topology", default="v5p:2x2x2")
  parser.add_argument("--model", default="qwen2_5_7b", choices=sorted(MODELS))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--cost", action="store_true", help="windowed einsum off (see tpu_aot_common)")
  parser.add_argument("--layers", type=int, default=0, help="decoder layers (0: the model's)")
  parser.add_argument("--hlo-out", default=None, help="write the optimised HLO here")
  args = parser.parse_args()

  module_name, config_name, class_name = MODELS[args.model]
  module = importlib.import_module(module_name)
  module.shard = _constrain_under_mesh
  config = getattr(module.ModelConfig, config_name)()
  # Qwen2 and Qwen3 take a compute dtype; Llama3's config has none (it computes in its params'
  # dtype), so its step casts the float32 master params to bfloat16 in the loss instead.
  has_dtype = "dtype" in {field.name for field in dataclasses.fields(config)}
  dtypes = {"dtype": jnp.bfloat16, "param_dtype": jnp.float32} if has_dtype else {}
  layers = {"num_layers": args.layers} if args.layers else {}
  config = dataclasses.replace(config, remat_config=module.RematConfig.BLOCK, **dtypes, **layers)
  # A v4 chip's two TensorCores as one device ("megacore"), as on a v4 VM and in `cftjax compile`.
  chip_config = {"chip_config_name": "megacore"} if args.topology.startswith("v4:") else {}
  devices = np.array(topologies.get_topology_desc(platform="tpu", topology_name=args.topology,
                                                  **chip_config).devices)
  mesh = Mesh(devices.reshape(devices.size, 1), ("fsdp", "tp"))

  with mesh:
    abstract_model = nnx.eval_shape(lambda: getattr(module, class_name)(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    specs = nnx.get_partition_spec(params)
    is_spec = lambda x: isinstance(x, PartitionSpec)
    param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s if is_spec(s) else PartitionSpec()),
                                   specs, is_leaf=is_spec)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                          param_shardings)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(5e-6))
    opt_state = jax.eval_shape(tx.init, params)
    # Adam's moments mirror the params: the same shardings, matched by their path's tail.
    by_path = {tuple(path): s for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

    def moment_sharding(path, _):
      for start in range(len(path)):
        if tuple(path[start:]) in by_path:
          return by_path[tuple(path[start:])]
      return NamedSharding(mesh, PartitionSpec())

    opt_shardings = jax.tree_util.tree_map_with_path(moment_sharding, opt_state)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_state,
                             opt_shardings)
    rows = NamedSharding(mesh, PartitionSpec("fsdp", None))
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32, sharding=rows)
    input_mask = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.bool_, sharding=rows)

    def train_step(params, opt_state, tokens, input_mask):
      def loss(p):
        if not has_dtype:
          p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p)
        model = nnx.merge(graphdef, p, rest)
        not_pad = tokens != 0
        return peft_trainer._default_loss_fn(model, tokens, input_mask, utils.build_positions_from_mask(not_pad),
                                             utils.make_causal_attn_mask(not_pad))
      value, grads = jax.value_and_grad(loss)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value

    step = jax.jit(train_step, in_shardings=(param_shardings, opt_shardings, rows, rows),
                   out_shardings=(param_shardings, opt_shardings, NamedSharding(mesh, PartitionSpec())),
                   donate_argnums=(0, 1))
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, tokens, input_mask).compile()
    seconds = time.perf_counter() - start
  import tunix  # pylint: disable=import-outside-toplevel
  common.emit(common.summary(compiled, seconds, args.hlo_out, system="tunix", model=args.model,
                             topology=args.topology, devices=int(devices.size), batch=args.batch, seq=args.seq,
                             versions={"tunix": getattr(tunix, "__version__", "?"), "jax": jax.__version__}))


if __name__ == "__main__":
  main()
