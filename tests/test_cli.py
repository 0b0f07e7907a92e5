"""The `cftjax` subcommands not covered elsewhere: data build / inspect, generate and doctor, through `cli.main`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax

from cftjax import cli
from cftjax.data import synthetic
from cftjax.models import ModelConfig, init_params
from cftjax.models.checkpoint_io import save_model_checkpoint
from cftjax.models.convert import hf_to_checkpoint
from cftjax.rewards import sandbox
from cftjax.tokenizer import Tokenizer
from tests.hf_reference import save_transformers_qwen2_dir


def test_data_build_writes_a_versioned_tfds_dataset(tmp_path, capsys):
  paths = synthetic.write_world(str(tmp_path / "world"), num_train=20, num_heldout=4)
  assert cli.main(["data", "build", "--input", paths["train"], "--out", str(tmp_path / "tfds"),
                   "--name", "demo_rows", "--version", "1.2.0", "--heldout-fraction", "0.25"]) == 0
  out = capsys.readouterr().out.strip().splitlines()[-1]
  assert out.endswith(os.path.join("demo_rows", "1.2.0"))
  assert os.path.exists(os.path.join(out, "dataset_info.json"))


def test_data_inspect_shows_the_loss_mask(tmp_path, capsys):
  run_dir = tmp_path / "run"
  assert cli.main(["data", "inspect", "--config", "configs/demo_cft.py", "--num", "2",
                   f"--config.train.run_dir={run_dir}", "--config.data.world.num_train=30",
                   "--config.data.world.num_heldout=5"]) == 0
  out = capsys.readouterr().out
  assert "[[" in out and "Conclusion" in out


def _tree(path):
  return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_data_inspect_writes_nothing_and_shows_the_checkpoints_tokenizer(tmp_path, capsys):
  save_transformers_qwen2_dir(tmp_path / "hf")
  hf_to_checkpoint(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
  rows = tmp_path / "rows.jsonl"
  rows.write_text(json.dumps({"question": "What is 1 + 2?", "solution": "3", "critique": "Right; 1; 2.\n"
                              "Conclusion: right"}) + "\n")
  before = _tree(tmp_path)
  assert cli.main(["data", "inspect", "--config", "configs/demo_cft.py", "--num", "1",
                   f"--config.train.run_dir={tmp_path / 'run'}", f"--config.model.init_from={tmp_path / 'ckpt'}",
                   f"--config.data.train_path={rows}", "--config.data.world.num_train=20",
                   "--config.data.world.num_heldout=4"]) == 0
  assert _tree(tmp_path) == before  # no world, no run dir, nothing else
  out = capsys.readouterr().out
  assert f"== tokenizer {tmp_path / 'ckpt' / 'tokenizer'}" in out
  assert "chat template from chat_template.jinja" in out
  assert "<|im_start|>system" in out and "Right; 1; 2." in out  # Qwen's default system turn; ';' is no <unk>
  assert "rows' own system turns are kept" in out


def test_generate_raw_system_and_json(tmp_path, capsys):
  save_transformers_qwen2_dir(tmp_path / "hf")
  hf_to_checkpoint(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
  ckpt = str(tmp_path / "ckpt")
  base = ["generate", "--ckpt", ckpt, "--prompt", "What is 1 + 2?", "--max-new-tokens", "4", "--json"]
  assert cli.main(base) == 0
  assert cli.main(base + ["--system", "Answer in one word."]) == 0
  assert cli.main(base + ["--raw"]) == 0
  chat, system, raw = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  tokenizer = Tokenizer.from_dir(tmp_path / "ckpt" / "tokenizer")
  user = [{"role": "user", "content": "What is 1 + 2?"}]
  assert chat["prompt_tokens"] == len(tokenizer.apply_chat_template(user, add_generation_prompt=True))
  assert system["prompt_tokens"] == len(tokenizer.apply_chat_template(
      [{"role": "system", "content": "Answer in one word."}] + user, add_generation_prompt=True))
  assert raw["prompt_tokens"] == len(tokenizer.encode("What is 1 + 2?"))
  for result in (chat, system, raw):
    assert result["num_tokens"] == len(result["completion_ids"]) <= 4
    assert result["completion"] == tokenizer.decode(result["completion_ids"], skip_special_tokens=True)
    assert result["stop_reason"] in ("stop", "length")


def test_generate_prints_one_completion_per_prompt(tmp_path, capsys):
  paths = synthetic.write_world(str(tmp_path / "world"), num_train=20, num_heldout=4)
  tokenizer = Tokenizer.from_dir(paths["tokenizer"])
  cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=16)
  save_model_checkpoint(str(tmp_path / "ckpt"), cfg, init_params(cfg, jax.random.key(0)), paths["tokenizer"])
  assert cli.main(["generate", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "What is 1 + 2?",
                   "--prompt", "What is 10 + 20?", "--max-new-tokens", "5"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) >= 2


def test_commands_print_no_noise(tmp_path, capsys):
  # TFDS prints a "Downloading and preparing dataset Unknown size" banner for every local build.
  paths = synthetic.write_world(str(tmp_path / "world"), num_train=8, num_heldout=2)
  assert cli.main(["data", "build", "--input", paths["train"], "--out", str(tmp_path / "tfds")]) == 0
  captured = capsys.readouterr()
  assert "Downloading and preparing" not in captured.out + captured.err
  assert "downloaded and prepared" not in captured.out + captured.err
  # JAX probing its TPU plugin on a host without TPUs, and a tiny model's size as "0.00B params".
  save_transformers_qwen2_dir(tmp_path / "hf")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "-m", "cftjax.cli", "convert", "--hf-dir", str(tmp_path / "hf"),
                         "--out", str(tmp_path / "ckpt")], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Unable to initialize backend" not in done.stderr
  assert "0.00B" not in done.stderr and "K params" in done.stderr


def test_doctor_prints_the_active_isolation(capsys, monkeypatch, tmp_path):
  assert cli.main(["doctor"]) == 0
  out = capsys.readouterr().out
  assert out.startswith('code sandbox (rl.code.isolation = "bwrap"): bwrap (bubblewrap ')
  assert "user, mount, pid, net, ipc, uts and cgroup namespaces, seccomp" in out
  monkeypatch.setenv("PATH", str(tmp_path))   # no bwrap
  monkeypatch.setattr(sandbox, "_probe_result", None)
  sandbox._bwrap_version.cache_clear()
  try:
    assert cli.main(["doctor"]) == 1
  finally:
    sandbox._bwrap_version.cache_clear()
  assert 'set rl.code.isolation = "none"' in capsys.readouterr().err
