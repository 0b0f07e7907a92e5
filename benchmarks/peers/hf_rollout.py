"""transformers + torch worker: greedy `generate` of exactly `new_tokens` tokens per prompt with
Qwen2ForCausalLM (KV cache; weights in the compute dtype, on CUDA when torch sees a GPU).
Usage: python hf_rollout.py SHAPES_JSON"""

from __future__ import annotations

import torch
import transformers

import harness
import hf_train


def main() -> None:
  shapes = harness.shapes_from_argv()
  model = hf_train.qwen2_model(shapes).to(getattr(torch, shapes.dtype)).eval()
  generator = torch.Generator().manual_seed(shapes.seed)
  prompts = torch.randint(1, shapes.vocab, (shapes.batch, shapes.seq), generator=generator)
  prompts = prompts.to(hf_train.DEVICE)
  attention_mask = torch.ones_like(prompts)
  box = {}

  def call():
    with torch.inference_mode():
      out = model.generate(prompts, attention_mask=attention_mask, do_sample=False, use_cache=True,
                           max_new_tokens=shapes.new_tokens, min_new_tokens=shapes.new_tokens,
                           pad_token_id=0, eos_token_id=None)
    box["generated"] = int((out.shape[1] - shapes.seq) * out.shape[0])

  result = harness.time_calls(call, shapes.warmup, shapes.steps)
  harness.emit(result | {"system": "transformers+torch", "generated_tokens": box["generated"],
                         "torch": torch.__version__, "transformers": transformers.__version__,
                         "device": hf_train.DEVICE})


if __name__ == "__main__":
  main()
