"""cftjax worker: greedy rollout of exactly `new_tokens` tokens per prompt with `cftjax.sampling.generate`
(no stop ids). Usage (driver only): python benchmarks/peers/cftjax_rollout.py SHAPES_JSON"""

from __future__ import annotations

import jax
import numpy as np

import cftjax_train
import harness
from cftjax import sampling
from cftjax.models import init_params


def main() -> None:
  shapes = harness.shapes_from_argv()
  cfg = cftjax_train.model_config(shapes)
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(shapes.seed))
  prompts = np.random.default_rng(shapes.seed).integers(1, shapes.vocab, (shapes.batch, shapes.seq),
                                                         dtype=np.int32)
  lengths = [shapes.seq] * shapes.batch
  box = {}

  def call():
    out = sampling.generate(params, cfg, prompts, prompt_lengths=lengths, rng=jax.random.key(0),
                            max_new_tokens=shapes.new_tokens, temperature=0.0, cache_dtype=shapes.dtype)
    box["generated"] = int(out.lengths.sum())

  result = harness.time_calls(call, shapes.warmup, shapes.steps)
  harness.emit(result | {"system": "cftjax", "generated_tokens": box["generated"],
                         "device": jax.devices()[0].device_kind, "jax": jax.__version__})


if __name__ == "__main__":
  main()
