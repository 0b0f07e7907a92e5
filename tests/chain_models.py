"""Tiny checkpoints whose greedy output is known in advance: every layer's weights are zero, so the
residual stream at a position is the (one-hot) embedding of its token and the next token depends on
the current token only (a bigram table in lm_head). `save_chain_model` makes a model that, after the
generation prompt's last token, writes a chosen text and then its end-of-turn token."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from cftjax.models import ModelConfig, abstract_params
from cftjax.models.checkpoint_io import save_model_checkpoint
from cftjax.tokenizer import Tokenizer


def chain_params(cfg: ModelConfig, chain: list[int], end_id: int, margin: float = 5.0,
                 logits: dict[tuple[int, int], float] | None = None) -> dict:
  """Params mapping chain[i] -> chain[i+1] and chain[-1] (and any other token) -> end_id.

  logits: {(token, next token): value} entries of lm_head set after the chain's (a token's own row
  then holds only these entries besides its chain successor's margin, so the largest one must
  still be the successor for greedy decoding to follow the chain). The logit of next token n after
  token t is lm_head[t, n] / sqrt(1 / hidden_size + rms_norm_eps) (the final norm of a one-hot row).
  """
  if len(set(chain)) != len(chain) or end_id in chain:
    raise ValueError(f"a bigram chain needs distinct tokens (and not end_id {end_id}); got {chain}")
  params = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), nn.unbox(abstract_params(cfg)))
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: np.ones_like(a) if "scale" in jax.tree_util.keystr(path) else a, params)
  params["embedding"] = np.eye(cfg.vocab_size, cfg.hidden_size, dtype=np.float32)
  head = np.zeros((cfg.hidden_size, cfg.vocab_size), np.float32)
  head[:, end_id] = 1.0
  head[chain[:-1], end_id] = 0.0
  for current, following in zip(chain, chain[1:] + [end_id]):
    head[current, following] = margin
  for (current, following), value in (logits or {}).items():
    head[current, following] = value
  params["lm_head"] = head
  return params


def save_chain_model(ckpt_dir: str, tokenizer_dir: str, prompt_end: list[int], text: str,
                     logits: dict[tuple[int, int], float] | None = None) -> list[int]:
  """Saves a checkpoint that answers `text` to any prompt ending in `prompt_end`[-1] (`chain_params`'
  logits overrides apply); returns the text's token ids."""
  tokenizer = Tokenizer.from_dir(tokenizer_dir)
  ids = list(tokenizer.encode(text))
  cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=tokenizer.vocab_size, intermediate_size=8,
                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=1024)
  save_model_checkpoint(ckpt_dir, cfg, chain_params(cfg, [prompt_end[-1]] + ids, tokenizer.eos_ids[0],
                                                      logits=logits),
                        tokenizer_dir)
  return ids
