"""`cftjax convert`: Hugging Face directory <-> cftjax model checkpoint, both directions."""

from __future__ import annotations

import logging
import os

from cftjax.models import checkpoint_io, peft_io
from cftjax.models.hf_io import HF_CONFIG_FILE, load_hf, save_hf

log = logging.getLogger(__name__)


def check_out_dir(out_dir: str, to_hf: bool) -> None:
  """Raises FileExistsError when `out_dir` already holds what a conversion would write there (a
  cftjax checkpoint, or with to_hf an HF model); cheap, so callers run it before reading weights."""
  if not to_hf:
    checkpoint_io.check_no_model_checkpoint(out_dir)
    return
  found = sorted(n for n in os.listdir(out_dir) if n == HF_CONFIG_FILE or n.endswith(".safetensors")
                 ) if os.path.isdir(out_dir) else []
  if found:
    raise FileExistsError(f"{out_dir} already holds a Hugging Face model ({', '.join(found[:3])}); "
                          "choose an empty --out directory")


def hf_to_checkpoint(hf_dir: str, out_dir: str, dtype: str = "float32") -> None:
  """Reads an HF model dir (config, safetensors, tokenizer files) and writes a cftjax checkpoint
  into `out_dir`, which must not hold one (checked before any weight is read)."""
  check_out_dir(out_dir, to_hf=False)
  cfg, params = load_hf(hf_dir, dtype=dtype, progress=True)
  checkpoint_io.save_model_checkpoint(out_dir, cfg, params, tokenizer_dir=hf_dir)
  log.info("converted %s (%s, %s params) -> %s", hf_dir, cfg.model_type, format_count(cfg.num_params), out_dir)


def format_count(n: int) -> str:
  """A parameter count for people: 1.54B, 494M, 37.6K, 512."""
  for factor, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
    if n >= factor:
      return f"{n / factor:.3g}{unit}"
  return str(n)


def export_hf(cfg, params, tokenizer, out_dir: str, max_shard_size: str = "5GB", dtype: str | None = None) -> None:
  """Writes params, tokenizer files and generation_config.json as an HF dir that transformers and vLLM
  load (`save_hf`); `out_dir` must not hold an HF model yet."""
  check_out_dir(out_dir, to_hf=True)
  save_hf(cfg, params, out_dir, max_shard_size=max_shard_size, dtype=dtype, tokenizer=tokenizer)
  log.info("exported %s model -> %s", cfg.model_type, os.path.abspath(out_dir))


def export_adapters(spec: str, out_dir: str) -> None:
  """Writes the LoRA adapters that `spec` (RUN_DIR[:best|:latest|:step=N]) selects in a training run
  (model.lora.rank > 0) as a PEFT adapter directory that `peft.PeftModel.from_pretrained` loads onto
  the Hugging Face base model, plus the tokenizer files."""
  ref = checkpoint_io.parse_checkpoint_ref(spec)
  cfg, adapters, tokenizer = checkpoint_io.load_run_adapters(ref)
  base = checkpoint_io.read_run_config(ref.path).model.init_from
  peft_io.save_adapters(cfg, adapters, out_dir, base_model=base)
  tokenizer.save(out_dir)
  if cfg.quantize_base != "none":
    log.warning("the adapters were trained on a %s base; on the float base their outputs differ by the "
                "base's rounding (docs/benchmarks.md)", cfg.quantize_base)
  log.info("exported the rank-%d adapters of %s -> %s", cfg.lora_rank, ref, os.path.abspath(out_dir))
