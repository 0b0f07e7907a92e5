"""How far QLoRA's quantized frozen bases (`model.lora.quantize_base` int8 / nf4 / int4) move a trained
model's outputs, against the same model's bf16 base (what a plain LoRA run freezes).

Loads a training run's params (`RUN_DIR`, `RUN_DIR:best`, ...; a LoRA run comes merged), stores the
targeted kernels (q, k, v, o, gate, up, down) each way with untrained adapters (B = 0: the base alone),
everything else bf16, compute bf16, and reports per base:
  - over the target tokens of the first --batches x --batch-size held-out rows (teacher-forced): max
    and mean |logit - bf16 logit|, mean KL(bf16 || base), top-1 agreement with bf16;
  - held-out verdict accuracy: greedy critiques of the run's first --verdict-examples labelled
    held-out rows (data.eval_path), scored as the trainer's eval scores them.

  python benchmarks/qlora_base_numerics.py --model runs/demo_cft:best
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from cftjax.data import pipeline
from cftjax.eval import heldout, runner
from cftjax.models import Decoder, checkpoint_io, init_params, lora


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", required=True, help="a training run: RUN_DIR[:best|:latest|:step=N]")
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--verdict-examples", type=int, default=200)
  parser.add_argument("--bases", default="bf16,int8,nf4,int4")
  args = parser.parse_args()
  cfg, params, tokenizer = checkpoint_io.load_model(args.model)
  config = checkpoint_io.read_run_config(checkpoint_io.parse_checkpoint_ref(args.model).path)
  data, ev = config.data, config.eval
  source = pipeline.eval_source(data)
  records = heldout.labelled_records(source, args.verdict_examples, data.on_bad_row)
  data.packing = False
  batches = pipeline.make_cft_iterator(data, tokenizer, sources=[source], batch_size=args.batch_size,
                                       num_epochs=1)
  batches = [{k: jnp.asarray(v) for k, v in batch.items()} for _, batch in zip(range(args.batches), batches)]
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  bf16_cfg = cfg.replace(dtype="bfloat16", attention="xla")
  models = {"bf16": (bf16_cfg, bf16)}
  for fmt in args.bases.split(","):
    if fmt != "bf16":
      qcfg = bf16_cfg.replace(lora_rank=1, quantize_base=fmt)
      zero_adapters = lora.split(init_params(qcfg, jax.random.key(0)))[1]  # B = 0: the base alone
      models[fmt] = (qcfg, lora.combine(jax.jit(lambda p, c=qcfg: lora.quantize_base(c, p))(bf16), zero_adapters))
  logits = {}
  for name, (model_cfg, model_params) in models.items():
    forward = jax.jit(lambda p, b, c=model_cfg: Decoder(c).apply(
        {"params": p}, b["inputs"], b["positions"], b["segment_ids"]))
    logits[name] = np.concatenate([np.asarray(forward(model_params, b), np.float32)[np.asarray(b["loss_mask"]) > 0]
                                   for b in batches])
  ref_logp = np.asarray(jax.nn.log_softmax(logits["bf16"], axis=-1))
  for name, (model_cfg, model_params) in models.items():
    started = time.time()
    summary, _ = runner.score_critiques(model_params, model_cfg, tokenizer, records, template=source["template"],
                                        verdict_style=ev.verdict_style, batch_size=ev.batch_size,
                                        max_new_tokens=ev.max_new_tokens)
    diff = np.abs(logits[name] - logits["bf16"])
    logp = np.asarray(jax.nn.log_softmax(logits[name], axis=-1))
    print(json.dumps({
        "base": name, "target_tokens": len(diff), "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "mean_kl_from_bf16": float(np.mean(np.sum(np.exp(ref_logp) * (ref_logp - logp), axis=-1))),
        "top1_agreement": float(np.mean(np.argmax(logits[name], -1) == np.argmax(logits["bf16"], -1))),
        "verdict_accuracy": summary["accuracy"], "verdict_examples": len(records),
        "verdict_missing_rate": summary["missing_rate"], "verdict_seconds": round(time.time() - started, 1)}),
        flush=True)


if __name__ == "__main__":
  main()
