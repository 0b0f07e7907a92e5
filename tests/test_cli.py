"""The `cftjax` subcommands not covered elsewhere: data build / inspect, generate and doctor, through `cli.main`."""

from __future__ import annotations

import os

import jax

from cftjax import cli
from cftjax.data import synthetic
from cftjax.models import ModelConfig, init_params
from cftjax.models.checkpoint_io import save_model_checkpoint
from cftjax.rewards import sandbox
from cftjax.tokenizer import Tokenizer


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
