"""`cftjax convert` both directions: HF -> Orbax checkpoint -> HF loads in transformers with equal logits."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import transformers

from cftjax.models import checkpoint_io
from cftjax import cli
from cftjax.models.convert import hf_to_checkpoint
from cftjax.models.hf_io import load_hf, save_hf
from cftjax.tokenizer import Tokenizer
from tests.tokenizer_fixtures import write_qwen_dir
from tests.hf_reference import (SAMPLING_DEFAULTS, hf_logits, make_hf_model, save_hf_model,
                                save_transformers_qwen2_dir)


def test_round_trip_keeps_weights_and_tokenizer(tmp_path):
  model = make_hf_model("qwen3_head_dim", vocab_size=640)  # room for the test tokenizer's 531 ids
  hf_dir = tmp_path / "hf"
  write_qwen_dir(hf_dir)
  save_hf_model(model, hf_dir)
  assert cli.main(["convert", "--hf-dir", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 0
  cfg, params, tok = checkpoint_io.load_model_checkpoint(str(tmp_path / "ckpt"))
  assert cfg.model_type == "qwen3" and cfg.head_dim == 32
  assert tok and os.path.exists(os.path.join(tok, "tokenizer_config.json"))
  assert cli.main(["convert", "--to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"),
                   "--max-shard-size", "40KB"]) == 0
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
  tokens = np.arange(40, dtype=np.int64).reshape(2, 20) % cfg.vocab_size
  np.testing.assert_allclose(hf_logits(back, tokens), hf_logits(model, tokens), atol=1e-5)
  assert (tmp_path / "back" / "tokenizer_config.json").exists()
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
  assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_refuses_to_overwrite(tmp_path):
  model = make_hf_model("llama32_tied")
  save_hf_model(model, tmp_path / "hf")
  hf_to_checkpoint(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
  with pytest.raises(FileExistsError, match="already exists"):
    hf_to_checkpoint(str(tmp_path / "hf"), str(tmp_path / "ckpt"))


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a cftjax model checkpoint"):
    checkpoint_io.load_model_checkpoint(str(tmp_path))


def test_convert_and_export_carry_chat_template_jinja_and_generation_config(tmp_path):
  hf_dir = tmp_path / "hf"
  save_transformers_qwen2_dir(hf_dir)
  assert (hf_dir / "chat_template.jinja").exists()
  assert "chat_template" not in json.loads((hf_dir / "tokenizer_config.json").read_text())
  assert cli.main(["convert", "--hf-dir", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 0
  assert (tmp_path / "ckpt" / "tokenizer" / "chat_template.jinja").exists()
  _, params, tokenizer = checkpoint_io.load_model(str(tmp_path / "ckpt"))
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == list(
      hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))

  assert cli.main(["convert", "--to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
  back = tmp_path / "back"
  assert (back / "chat_template.jinja").read_text() == (hf_dir / "chat_template.jinja").read_text()
  generation = json.loads((back / "generation_config.json").read_text())
  source = json.loads((hf_dir / "generation_config.json").read_text())
  for key in ("eos_token_id", "pad_token_id", *SAMPLING_DEFAULTS):
    assert generation[key] == source[key], key
  loaded = transformers.GenerationConfig.from_pretrained(str(back))
  assert loaded.temperature == SAMPLING_DEFAULTS["temperature"] and loaded.pad_token_id == source["pad_token_id"]
  exported_tokenizer = transformers.AutoTokenizer.from_pretrained(str(back))
  assert exported_tokenizer.apply_chat_template(messages, tokenize=False) == hf_tokenizer.apply_chat_template(
      messages, tokenize=False)


def test_save_hf_writes_the_tokenizer_it_is_given(tmp_path):
  save_transformers_qwen2_dir(tmp_path / "hf")
  cfg, params = load_hf(str(tmp_path / "hf"))
  save_hf(cfg, params, str(tmp_path / "out"), tokenizer=Tokenizer.from_dir(tmp_path / "hf"))
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    assert (tmp_path / "out" / name).exists(), name
