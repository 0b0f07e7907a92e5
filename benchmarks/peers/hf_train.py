"""transformers + torch worker: one train step of Qwen2ForCausalLM (forward + mean token CE + backward
+ grad clipping + torch.optim.AdamW), eager, on CUDA when torch sees a GPU. float32 weights; with
dtype bfloat16 the forward runs under torch.autocast (bf16 compute over float32 master weights, as
cftjax). Usage: python hf_train.py SHAPES_JSON"""

from __future__ import annotations

import torch
import transformers

import harness

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def qwen2_model(shapes: harness.Shapes) -> transformers.Qwen2ForCausalLM:
  config = transformers.Qwen2Config(
      vocab_size=shapes.vocab, hidden_size=shapes.hidden, intermediate_size=shapes.intermediate,
      num_hidden_layers=shapes.layers, num_attention_heads=shapes.heads,
      num_key_value_heads=shapes.kv_heads, rope_theta=shapes.rope_theta,
      rms_norm_eps=shapes.rms_norm_eps, tie_word_embeddings=shapes.tie_embeddings, use_cache=False,
      max_position_embeddings=4096, attn_implementation="sdpa")
  torch.manual_seed(shapes.seed)
  return transformers.Qwen2ForCausalLM(config).float().to(DEVICE)


def main() -> None:
  shapes = harness.shapes_from_argv()
  model = qwen2_model(shapes).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=shapes.lr, weight_decay=shapes.weight_decay)
  generator = torch.Generator().manual_seed(shapes.seed)
  ids = torch.randint(0, shapes.vocab, (shapes.batch, shapes.seq + 1), generator=generator)
  inputs, targets = ids[:, :-1].contiguous().to(DEVICE), ids[:, 1:].contiguous().to(DEVICE)
  box = {}

  def call():
    with torch.autocast(DEVICE, torch.bfloat16, enabled=shapes.dtype == "bfloat16"):
      logits = model(input_ids=inputs).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, shapes.vocab).float(),
                                               targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), shapes.grad_clip)
    optimizer.step()
    box["loss"] = loss.item()

  result = harness.time_calls(call, shapes.warmup, shapes.steps)
  harness.emit(result | {"system": "transformers+torch", "final_loss": box["loss"],
                         "torch": torch.__version__, "transformers": transformers.__version__,
                         "torch_threads": torch.get_num_threads(), "device": DEVICE})


if __name__ == "__main__":
  main()
