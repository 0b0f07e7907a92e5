"""tunix worker: greedy rollout of exactly `new_tokens` tokens per prompt with tunix's vanilla
`tunix.generate.sampler.Sampler` on its Qwen2 (no eos stop). Usage: python tunix_rollout.py SHAPES_JSON"""

from __future__ import annotations

import numpy as np
from tunix.generate import sampler as sampler_lib

import harness
import tunix_common

NO_STOP = [-1]  # an id the model never samples: no row stops early


class IdTokenizer:
  """Prompts are written as space-separated token ids (the sampler wants strings); 0 pads."""

  def encode(self, text: str, **_) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids, **_) -> str:
    return " ".join(str(int(t)) for t in ids)

  def bos_id(self) -> int:
    return 0  # falsy: the sampler adds no BOS

  def eos_id(self) -> int:
    return NO_STOP[0]

  def pad_id(self) -> int:
    return 0


def main() -> None:
  shapes = harness.shapes_from_argv()
  model = tunix_common.qwen2_model(shapes, param_dtype=shapes.dtype)  # sampling weights, as HF's
  sampler = sampler_lib.Sampler(
      model, IdTokenizer(),
      sampler_lib.CacheConfig(cache_size=shapes.seq + shapes.new_tokens, num_layers=shapes.layers,
                              num_kv_heads=shapes.kv_heads, head_dim=shapes.head_dim))
  prompts = np.random.default_rng(shapes.seed).integers(1, shapes.vocab, (shapes.batch, shapes.seq))
  texts = [" ".join(map(str, row)) for row in prompts]
  box = {}

  def call():
    out = sampler(texts, max_generation_steps=shapes.new_tokens, max_prompt_length=shapes.seq,
                  eos_tokens=NO_STOP, temperature=0.0)
    box["generated"] = sum(len(t) for t in out.tokens)

  result = harness.time_calls(call, shapes.warmup, shapes.steps)
  harness.emit(result | {"system": "tunix", "generated_tokens": box["generated"]})


if __name__ == "__main__":
  main()
