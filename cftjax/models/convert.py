"""`cftjax convert`: Hugging Face directory <-> cftjax model checkpoint, both directions."""

from __future__ import annotations

import logging
import os

from cftjax.models import checkpoint_io
from cftjax.models.hf_io import load_hf, save_hf

log = logging.getLogger(__name__)


def hf_to_checkpoint(hf_dir: str, out_dir: str, dtype: str = "float32") -> None:
  """Reads an HF model dir (config, safetensors, tokenizer files) and writes a cftjax checkpoint."""
  cfg, params = load_hf(hf_dir, dtype=dtype, progress=True)
  checkpoint_io.save_model_checkpoint(out_dir, cfg, params, tokenizer_dir=hf_dir)
  log.info("converted %s (%s, %.2fB params) -> %s", hf_dir, cfg.model_type, cfg.num_params / 1e9, out_dir)


def export_hf(cfg, params, tokenizer, out_dir: str, max_shard_size: str = "5GB", dtype: str | None = None) -> None:
  """Writes params (+ tokenizer files) as an HF dir that transformers and vLLM load."""
  save_hf(cfg, params, out_dir, max_shard_size=max_shard_size, dtype=dtype)
  if tokenizer is not None:
    tokenizer.save(out_dir)
  log.info("exported %s model -> %s", cfg.model_type, os.path.abspath(out_dir))
