"""cftjax's converted-model checkpoint: Orbax params + `model_config.json` + the tokenizer files.

Layout of DIR: `params/` (Orbax), `model_config.json` (ModelConfig fields), `tokenizer/` (optional).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from cftjax.models.config import ModelConfig
from cftjax.models.decoder import abstract_params

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt")


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
  """Copies whichever tokenizer files `src_dir` has; returns their names."""
  found = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(src_dir, f))]
  if found:
    os.makedirs(dst_dir, exist_ok=True)
  for name in found:
    shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
  return found


def save_model_checkpoint(out_dir: str, cfg: ModelConfig, params: dict[str, Any],
                          tokenizer_dir: str | None = None) -> None:
  """Writes params (Orbax, every process takes part), the model config and tokenizer files (process 0)."""
  out_dir = os.path.abspath(out_dir)
  params_dir = os.path.join(out_dir, PARAMS_DIR)
  if os.path.exists(params_dir):
    raise FileExistsError(f"{params_dir} already exists; choose an empty --out directory")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(params_dir, params)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
      json.dump(cfg.to_json_dict(), f, indent=2)
    if tokenizer_dir:
      copy_tokenizer_files(tokenizer_dir, os.path.join(out_dir, TOKENIZER_DIR))


def read_model_config(ckpt_dir: str, **overrides) -> ModelConfig:
  path = os.path.join(ckpt_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {ckpt_dir} is not a cftjax model checkpoint "
                            "(make one with `cftjax convert --hf-dir DIR --out DIR`)")
  with open(path) as f:
    return ModelConfig(**{**json.load(f), **overrides})


def load_model_checkpoint(ckpt_dir: str, shardings: Any = None,
                          config_overrides: dict[str, Any] | None = None) -> tuple[ModelConfig, dict, str | None]:
  """Returns (cfg, params, tokenizer_dir or None); params restored straight onto `shardings` if given."""
  ckpt_dir = os.path.abspath(ckpt_dir)
  cfg = read_model_config(ckpt_dir, **(config_overrides or {}))
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  abstract = nn.unbox(abstract_params(cfg))
  if shardings is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(ckpt_dir, PARAMS_DIR), abstract)
  tok = os.path.join(ckpt_dir, TOKENIZER_DIR)
  return cfg, params, tok if os.path.isdir(tok) else None
