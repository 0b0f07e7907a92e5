"""The researcher's path, end to end, as docs/recipes.md tells it: a transformers-saved instruct
checkpoint -> `cftjax convert` -> `cftjax data inspect` (writes nothing) -> `cftjax train` -> Ctrl-C
(SIGINT saves) -> resume -> `cftjax eval` (writes nothing into a checkpoint) -> `cftjax convert --to-hf`
-> transformers loads the export with its tokenizer and greedily generates what `cftjax generate`
generates."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import transformers

from cftjax import cli
from tests.hf_reference import save_transformers_qwen2_dir
from tests.run_files import metric_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Please critique whether the following solution to the question is correct.\n\nQuestion:\n" \
         "What is 12 + 7?\n\nSolution:\n12 + 7 = 19\n\n"
NEW_TOKENS = 8


def _rows(count: int, offset: int) -> list[dict]:
  rows = []
  for i in range(offset, offset + count):
    a, b, wrong = 10 + i, 3 + i % 7, i % 2
    total = a + b + wrong
    verdict = "wrong" if wrong else "right"
    rows.append({"question": f"What is {a} + {b}?", "solution": f"{a} + {b} = {total}",
                 "critique": f"{a} + {b} is {a + b}; the solution says {total}. Conclusion: {verdict}",
                 "label": not wrong, "id": f"row-{i}", "level": i % 3})  # level: kept as metadata
  return rows


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return str(path)


def _tree(path) -> list[str]:
  """Every file and folder under `path` with its size (files), relative to it."""
  root = pathlib.Path(path)
  return sorted(f"{p.relative_to(root)}:{p.stat().st_size if p.is_file() else 'dir'}" for p in root.rglob("*"))


def _write_config(tmp_path: pathlib.Path, ckpt: str, train: str, heldout: str, run_dir: str) -> str:
  config = tmp_path / "critic.py"
  config.write_text(textwrap.dedent(f"""
      from cftjax.config import base_config

      def get_config():
        c = base_config()
        c.model.init_from = {ckpt!r}
        c.data.train_path = {train!r}
        c.data.eval_path = {heldout!r}
        c.data.template = "cft"
        c.data.max_seq_len = 192
        c.data.batch_size = 4
        c.data.packing = False
        c.train.run_dir = {run_dir!r}
        c.train.steps = 400
        c.train.cpu_peak_flops = 1e11
        c.optim.warmup_ratio = 0.0
        c.checkpoint.every_steps = 1000
        c.checkpoint.best_metric = "eval_loss"
        c.checkpoint.best_mode = "min"
        c.eval.loss_batches = 1
        c.eval.batch_size = 4
        c.eval.verdict_examples = 0
        c.logging.every_steps = 1
        c.logging.tensorboard = False
        c.logging.progress_bar = False
        return c
      """))
  return str(config)


def _train_steps(run_dir: str) -> list[int]:
  return [row["step"] for row in metric_rows(run_dir) if row.get("split") == "train"]


def _start_training(config: str, tmp_path: pathlib.Path, *overrides: str) -> subprocess.Popen:
  """`cftjax train` in its own process (one CPU device), as a user runs it."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.Popen([sys.executable, "-m", "cftjax.cli", "--log_level=WARNING", "train", "--config", config,
                           *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _hf_greedy(export: str, prompt: str) -> str:
  model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(export)
  ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
  with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, top_k=None, top_p=None,
                         temperature=None, repetition_penalty=None)
  return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_convert_inspect_train_interrupt_resume_eval_export_generate(tmp_path, capsys):
  # 1. A checkpoint as transformers 5 saves it (chat template only in chat_template.jinja).
  hf_dir = tmp_path / "Qwen2-tiny-Instruct"
  save_transformers_qwen2_dir(hf_dir)
  ckpt = str(tmp_path / "converted")
  assert cli.main(["convert", "--hf-dir", str(hf_dir), "--out", ckpt]) == 0
  train = _write_jsonl(tmp_path / "train.jsonl", _rows(32, 0))
  heldout = _write_jsonl(tmp_path / "heldout.jsonl", _rows(8, 100))
  run_dir = str(tmp_path / "run")
  config = _write_config(tmp_path, ckpt, train, heldout, run_dir)

  # 2. inspect: the converted checkpoint's tokenizer and chat template, and no file written anywhere.
  before = _tree(tmp_path)
  capsys.readouterr()
  assert cli.main(["data", "inspect", "--config", config, "--num", "1"]) == 0
  shown = capsys.readouterr().out
  assert _tree(tmp_path) == before
  assert f"== tokenizer {ckpt}/tokenizer" in shown and "chat_template.jinja" in shown
  assert "<|im_start|>system" in shown and "[[" in shown

  # 3. train, Ctrl-C: the steps so far are saved, the exit is 130 without a traceback.
  process = _start_training(config, tmp_path)
  deadline = time.time() + 300
  while len(_train_steps(run_dir)) < 3:
    assert process.poll() is None, process.stderr.read()[-5000:]
    assert time.time() < deadline, "no training steps logged"
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=300)
  assert process.returncode == 130, err[-5000:]
  assert "Traceback" not in err, err[-5000:]
  with open(os.path.join(run_dir, "summary.json")) as f:
    interrupted = json.load(f)
  assert interrupted["signal"] == "SIGINT" and interrupted["steps"] >= 3
  saved = sorted(int(step) for step in os.listdir(os.path.join(run_dir, "checkpoints")) if step.isdigit())
  assert saved[-1] == interrupted["steps"]

  # 4. resume: the run continues from the saved step to the end.
  final_steps = interrupted["steps"] + 2
  process = _start_training(config, tmp_path, f"--config.train.steps={final_steps}")
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-5000:]
  assert f"steps {interrupted['steps']} -> {final_steps}" in out
  resumed = [step for step in _train_steps(run_dir) if step > interrupted["steps"]]
  assert resumed == list(range(interrupted["steps"] + 1, final_steps + 1))

  # 5. eval on the run dir: results land in RUN_DIR/eval, no checkpoint changes.
  checkpoints = {name: _tree(os.path.join(run_dir, name)) for name in ("checkpoints", "best")}
  converted = _tree(ckpt)
  assert cli.main(["eval", "--config", os.path.join(REPO, "configs", "eval_demo.py"), "--ckpt", run_dir,
                   f"--config.benchmarks.heldout.path={heldout}", "--config.benchmarks.heldout.max_new_tokens=4",
                   "--config.limit=2", "--config.batch_size=2", "--config.progress_bar=false"]) == 0
  assert {name: _tree(os.path.join(run_dir, name)) for name in checkpoints} == checkpoints
  assert _tree(ckpt) == converted
  assert os.path.exists(os.path.join(run_dir, "eval", "demo", "summary.json"))

  # 6. export, and transformers generates what `cftjax generate` generates from the same run.
  export = str(tmp_path / "export")
  assert cli.main(["convert", "--to-hf", "--ckpt", run_dir, "--out", export]) == 0
  generation = json.loads(pathlib.Path(export, "generation_config.json").read_text())
  source = json.loads((hf_dir / "generation_config.json").read_text())
  assert {k: generation.get(k) for k in source if k != "transformers_version"} == {
      k: v for k, v in source.items() if k != "transformers_version"}
  capsys.readouterr()
  assert cli.main(["generate", "--ckpt", run_dir, "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS),
                   "--json"]) == 0
  ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert ours["num_tokens"] > 0
  assert _hf_greedy(export, PROMPT) == ours["completion"]
