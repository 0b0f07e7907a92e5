"""How far the int8 base of QLoRA (`model.lora.quantize_base=int8`) moves a model's outputs, against
the same model in bf16 (the usual frozen base) and in float32 (the reference).

Loads a model (a `cftjax convert` checkpoint or a training run dir; a LoRA run comes merged), runs
held-out rows through it three ways and reports, over the target tokens: the max and mean |logit
difference| to float32, the mean KL(float32 || variant) and the top-1 agreement with float32.
  bf16: params and compute in bfloat16;
  int8: the targeted kernels (q, k, v, o, gate, up, down) int8 with per-channel scales, everything
        else bfloat16, compute in bfloat16 (what a QLoRA run's frozen base computes).

  python benchmarks/int8_base_numerics.py --model runs/demo_cft --rows runs/demo_cft/world/heldout.jsonl
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from cftjax.data import pipeline
from cftjax.models import Decoder, checkpoint_io, init_params, lora
from cftjax.config import base_config


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", required=True)
  parser.add_argument("--rows", required=True, help="CFT rows (JSONL) to score")
  parser.add_argument("--step", default="best", help="of a run dir: best, latest or a step number")
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--max-seq-len", type=int, default=128)
  args = parser.parse_args()
  step = int(args.step) if args.step.isdigit() else args.step
  cfg, params, tokenizer = checkpoint_io.load_model(args.model, step=step)
  data = base_config().data
  data.max_seq_len, data.packing, data.length_policy = args.max_seq_len, False, "truncate"
  batches = pipeline.make_cft_iterator(data, tokenizer, sources=[{"path": args.rows, "format": "auto"}],
                                       batch_size=args.batch_size, num_epochs=1)
  qcfg = cfg.replace(lora_rank=1, quantize_base="int8", dtype="bfloat16", attention="xla")
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  zero_adapters = lora.split(init_params(qcfg, jax.random.key(0)))[1]  # B = 0: the base alone
  int8 = lora.combine(lora.quantize_base(qcfg, bf16), zero_adapters)
  runs = {
      "bf16": jax.jit(lambda b: Decoder(cfg.replace(dtype="bfloat16", attention="xla")).apply({"params": bf16}, *b)),
      "int8": jax.jit(lambda b: Decoder(qcfg).apply({"params": int8}, *b)),
  }
  reference = jax.jit(lambda b: Decoder(cfg.replace(dtype="float32", attention="xla")).apply({"params": params}, *b))
  stats = {name: {"abs": [], "kl": [], "top1": []} for name in runs}
  for i, batch in enumerate(batches):
    if i == args.batches:
      break
    inputs = tuple(jnp.asarray(batch[k]) for k in ("inputs", "positions", "segment_ids"))
    mask = np.asarray(batch["loss_mask"]) > 0
    ref = np.asarray(reference(inputs), np.float32)[mask]
    ref_logp = jax.nn.log_softmax(ref, axis=-1)
    for name, run in runs.items():
      out = np.asarray(run(inputs), np.float32)[mask]
      logp = jax.nn.log_softmax(out, axis=-1)
      stats[name]["abs"].append(np.abs(out - ref))
      stats[name]["kl"].append(np.asarray(jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)))
      stats[name]["top1"].append(np.argmax(out, -1) == np.argmax(ref, -1))
  for name, s in stats.items():
    diff = np.concatenate([a.ravel() for a in s["abs"]])
    print(json.dumps({"variant": name, "target_tokens": int(sum(len(t) for t in s["top1"])),
                      "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
                      "mean_kl": float(np.concatenate(s["kl"]).mean()),
                      "top1_agreement": float(np.concatenate(s["top1"]).mean())}))


if __name__ == "__main__":
  main()
