"""Tiny random Hugging Face models saved to disk, the numerical reference for cftjax's decoder."""

from __future__ import annotations

import numpy as np
import torch
import transformers

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)

# name -> (config class, model class, config fields)
VARIANTS = {
    "qwen2_untied_bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                          dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "qwen2_tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                   dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3_head_dim": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                       dict(head_dim=32, tie_word_embeddings=False, rope_theta=1000000.0)),
    "llama31_rope_scaling": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                             dict(tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=256,
                                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama32_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                     dict(tie_word_embeddings=True, rope_theta=500000.0)),
}


def make_hf_model(variant: str, seed: int = 0, dtype=torch.float32, **overrides):
  """A randomly initialised transformers model; biases and norm scales randomised so every tensor matters."""
  config_cls, model_cls, fields = VARIANTS[variant]
  config = config_cls(**{**BASE, **fields, **overrides})
  config.pad_token_id = None
  torch.manual_seed(seed)
  model = model_cls(config).to(dtype).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(torch.randn_like(p) * 0.1)
  return model


def save_hf_model(model, path, max_shard_size="50GB") -> None:
  model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.as_tensor(tokens, dtype=torch.long))
  return out.logits.float().numpy()


SAMPLING_DEFAULTS = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)


def save_transformers_qwen2_dir(path, seed: int = 0):
  """A tiny Qwen2-style instruct checkpoint as transformers 5 saves it: safetensors, config.json,
  generation_config.json (eos/pad and sampling defaults), tokenizer.json, tokenizer_config.json and
  the chat template only in chat_template.jinja. Returns the model."""
  import pathlib  # pylint: disable=import-outside-toplevel
  from tests.tokenizer_fixtures import write_qwen_dir  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  source = write_qwen_dir(path.parent / f"{path.name}_tokenizer_source")
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
  tokenizer.save_pretrained(str(path))
  model = make_hf_model("qwen2_tied", seed=seed, vocab_size=640)  # room for the tokenizer's 531 ids
  eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
  model.generation_config = transformers.GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                                          **SAMPLING_DEFAULTS)
  save_hf_model(model, path)
  return model
