"""A LoRA CFT run on a converted Hugging Face model (adapters alone, and adapters with the embedding
and lm_head trained whole: model.lora.modules_to_save), exported two ways and checked against the
libraries that own the formats: `cftjax convert --to-hf` (adapters merged) loaded by transformers, and
`--adapters-only` (a PEFT directory, with the tensors peft itself saves for the same adapter config)
loaded by peft onto the HF base, both giving cftjax's logits with the adapters (float32); the PEFT
directory imported back (`model.lora.init_from`) continues training."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import peft
import pytest
import transformers
from safetensors import safe_open

from cftjax import cli, launch
from cftjax.config import base_config
from cftjax.data import synthetic
from cftjax.models import Decoder, checkpoint_io, lora
from tests.hf_reference import hf_logits, make_hf_model, save_hf_model
from tests.tokenizer_fixtures import write_qwen_dir

TOKENS = (np.arange(2 * 20).reshape(2, 20) * 13 % 600).astype(np.int64)
ATOL = 1e-4  # float32, transformers vs cftjax


def lora_config(tmp_path, ckpt: str, world: str, run_dir: str, steps: int,
                modules_to_save: tuple[str, ...] = ()):
  c = base_config()
  c.model.init_from = ckpt
  c.model.lora.modules_to_save = modules_to_save
  c.model.lora.rank = 4
  c.model.lora.alpha = 8.0
  c.model.lora.targets = ("q", "v", "o", "gate", "down")
  c.data.train_path = os.path.join(world, "train.jsonl")
  c.data.eval_path = os.path.join(world, "heldout.jsonl")
  c.data.max_seq_len = 512
  c.data.length_policy = "truncate"
  c.data.batch_size = 8
  c.data.packing = False
  c.optim.lr = 2e-2  # large enough that a few steps move the adapters far from B = 0
  c.optim.warmup_ratio = 0.0
  c.train.run_dir = run_dir
  c.train.steps = steps
  c.train.chunk_size = 512
  c.eval.at_start = True
  c.eval.loss_batches = 1
  c.eval.batch_size = 8
  c.eval.every_steps = 0
  c.eval.verdict_examples = 0
  c.checkpoint.best_metric = "eval_loss"
  c.checkpoint.best_mode = "min"
  c.checkpoint.async_save = False
  c.logging.tensorboard = False
  c.logging.progress_bar = False
  return c


@pytest.fixture(scope="module", params=[(), ("embed_tokens", "lm_head")], ids=["adapters", "saved_modules"])
def lora_run(tmp_path_factory, request):
  root = tmp_path_factory.mktemp("lora_export")
  hf_model = make_hf_model("qwen2_untied_bias", vocab_size=640)
  hf_dir = root / "hf"
  write_qwen_dir(hf_dir)
  save_hf_model(hf_model, hf_dir)
  ckpt = str(root / "ckpt")
  assert cli.main(["convert", "--hf-dir", str(hf_dir), "--out", ckpt]) == 0
  world = str(root / "world")
  synthetic.write_world(world, num_train=40, num_heldout=8)
  run_dir = str(root / "run")
  summary = launch.train(lora_config(root, ckpt, world, run_dir, steps=3, modules_to_save=request.param))
  return {"root": root, "hf_dir": str(hf_dir), "ckpt": ckpt, "world": world, "run": run_dir,
          "summary": summary, "modules_to_save": request.param}


def cftjax_logits(run_dir: str) -> np.ndarray:
  """Logits of the run's base + its best adapters, unmerged, in float32."""
  cfg, adapters, _ = checkpoint_io.load_run_adapters(run_dir)
  base = checkpoint_io.load_init_params(checkpoint_io.read_run_config(run_dir).model.init_from, None)
  assert max(float(np.abs(a["b"]).max()) for g in adapters["layers"].values() for a in g.values()) > 1e-3
  for param in lora.saved_params(cfg.lora_modules_to_save):  # trained whole: moved from the base's copy
    assert float(np.abs(adapters[param] - base[param]).max()) > 1e-3, param
  return np.asarray(Decoder(cfg).apply({"params": lora.combine(base, adapters)}, TOKENS.astype(np.int32)))


def tensor_shapes(adapter_dir: str) -> dict[str, tuple[int, ...]]:
  with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="np") as f:
    return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def test_merged_export_loads_in_transformers_with_the_adapted_logits(lora_run):
  out = str(lora_run["root"] / "merged")
  assert cli.main(["convert", "--to-hf", "--ckpt", lora_run["run"], "--out", out]) == 0
  merged = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype="float32")
  expected = cftjax_logits(lora_run["run"])
  np.testing.assert_allclose(hf_logits(merged, TOKENS), expected, atol=ATOL)
  base = transformers.AutoModelForCausalLM.from_pretrained(lora_run["hf_dir"], torch_dtype="float32")
  assert np.abs(hf_logits(base, TOKENS) - expected).max() > 100 * ATOL  # the adapters matter


def test_peft_directory_loads_in_peft_and_imports_back(lora_run):
  out = str(lora_run["root"] / "peft")
  assert cli.main(["convert", "--to-hf", "--ckpt", lora_run["run"], "--out", out, "--adapters-only"]) == 0
  with open(os.path.join(out, "adapter_config.json")) as f:
    config = json.load(f)
  assert (config["r"], config["lora_alpha"]) == (4, 8.0)
  assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "o_proj", "q_proj", "v_proj"]
  assert config["modules_to_save"] == (list(lora_run["modules_to_save"]) or None)
  # The tensors (names, shapes) are those peft saves for a model it adapted itself with this config.
  reference = str(lora_run["root"] / "peft_reference")
  fresh = transformers.AutoModelForCausalLM.from_pretrained(lora_run["hf_dir"], torch_dtype="float32")
  peft.get_peft_model(fresh, peft.LoraConfig.from_pretrained(out)).save_pretrained(reference)
  assert tensor_shapes(out) == tensor_shapes(reference)
  base = transformers.AutoModelForCausalLM.from_pretrained(lora_run["hf_dir"], torch_dtype="float32")
  adapted = peft.PeftModel.from_pretrained(base, out).eval()
  np.testing.assert_allclose(hf_logits(adapted, TOKENS), cftjax_logits(lora_run["run"]), atol=ATOL)

  # Import it back and continue: the new run starts where the first ended (same held-out loss) and
  # its adapters keep moving.
  run_dir = str(lora_run["root"] / "continued")
  config = lora_config(lora_run["root"], lora_run["ckpt"], lora_run["world"], run_dir, steps=2,
                       modules_to_save=lora_run["modules_to_save"])
  config.model.lora.init_from = out
  summary = launch.train(config)
  first = lora_run["summary"]
  np.testing.assert_allclose(summary["initial_eval"]["eval_loss"], first["best_value"], rtol=1e-5)
  assert summary["final_eval"]["eval_loss"] != pytest.approx(summary["initial_eval"]["eval_loss"], rel=1e-6)
  _, imported, _ = checkpoint_io.load_run_adapters(run_dir + ":latest")
  _, exported, _ = checkpoint_io.load_run_adapters(lora_run["run"])
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), imported, exported)
  assert min(jax.tree.leaves(moved)) > 0


def test_adapters_only_of_a_full_fine_tune_is_a_clear_error(lora_run, tmp_path, capsys):
  code = cli.main(["convert", "--hf-dir", lora_run["hf_dir"], "--out", str(tmp_path / "x"), "--adapters-only"])
  assert code == 2
  assert "--adapters-only goes with --to-hf" in capsys.readouterr().err.strip().splitlines()[-1]
  assert not (tmp_path / "x").exists()
