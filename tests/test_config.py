"""Config files, `--config.a.b=v` overrides, the run-dir config.json and the shipped configs."""

from __future__ import annotations

import json
import os

import pytest

from cftjax import cli
from cftjax import config as config_lib
from cftjax.data import pipeline, readers
from cftjax.data.critique import CritiqueRecord
from cftjax.eval import suites
from cftjax.rewards.registry import RewardComputer
from cftjax.train import state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFT_CONFIGS = ("demo_cft.py", "one_shot_cft_qwen2_5_math_7b.py", "one_shot_cft_qwen2_5_math_1_5b.py",
               "one_shot_cft_llama3_2_3b.py", "cft_webinstruct_qwen2_5_math_7b.py",
               "deepcritic_qwen2_5_7b_sft.py", "demo_critic_from_data.py")


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "my_exp.py"
  path.write_text("from cftjax.config import base_config\n\n"
                  "def get_config(arg=None):\n"
                  "  c = base_config()\n"
                  "  c.optim.lr = 1e-4 if arg is None else float(arg)\n"
                  "  c.eval.verdict_style = 'cft'\n"
                  "  return c\n")
  return str(path)


def test_overrides_parse_by_field_type(config_file):
  overrides, rest = config_lib.split_override_args(
      ["--config.optim.lr=3e-5", "--config.train.steps", "12", "--config.data.packing=false",
       "--config.model.init_from=/ckpt", "--config.data.sources=({'path': 'a.jsonl', 'weight': 2.0},)",
       "--config.eval.verdict_style=crl", "positional"])
  assert rest == ["positional"]
  config = config_lib.load_config(config_file, overrides)
  assert config.optim.lr == 3e-5 and isinstance(config.optim.lr, float)
  assert config.train.steps == 12 and isinstance(config.train.steps, int)
  assert config.data.packing is False
  assert config.model.init_from == "/ckpt"  # a None placeholder typed str
  assert config.data.sources == ({"path": "a.jsonl", "weight": 2.0},)
  assert config.eval.verdict_style == "crl"
  assert config.train.run_dir == os.path.join("runs", "my_exp")  # defaults to the config file's name


def test_config_file_argument_after_colon(config_file):
  assert config_lib.load_config(config_file + ":0.25").optim.lr == 0.25


@pytest.mark.parametrize("path,text,message", [
    ("optim.lrr", "1", "unknown config key 'config.optim.lrr'; did you mean 'config.optim.lr'"),
    ("optimm.lr", "1", "did you mean 'config.optim.lr'"),
    ("optim", "1", "names a section"),
    ("train.steps", "1.5", "--config.train.steps=1.5: cannot parse as int"),
    ("data.packing", "yes", "cannot parse as bool"),
])
def test_bad_overrides_name_the_key(config_file, path, text, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
    config_lib.load_config(config_file, [(path, text)])


def test_cli_reports_unknown_key_with_suggestion(config_file, capsys):
  code = cli.main(["train", "--config", config_file, "--config.optim.warmup_ration=0.1"])
  assert code == 2
  assert "did you mean 'config.optim.warmup_ratio'" in capsys.readouterr().err


def test_run_config_records_code_version_and_refuses_shape_changes(config_file, tmp_path):
  run_dir = str(tmp_path / "run")
  config = config_lib.load_config(config_file)
  config_lib.write_run_config(run_dir, config)
  with open(os.path.join(run_dir, "config.json")) as f:
    record = json.load(f)
  assert record["config"]["optim"]["lr"] == 1e-4
  assert record["code_version"]["cftjax"]
  assert "git_sha" in record["code_version"]

  schedule_change = config_lib.load_config(config_file, [("optim.lr", "5e-5"), ("train.steps", "9")])
  config_lib.check_run_config(run_dir, schedule_change)  # allowed: no shape changes

  shape_change = config_lib.load_config(config_file, [("model.arch.hidden_size", "128"),
                                                      ("data.max_seq_len", "64")])
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.check_run_config(run_dir, shape_change)
  assert "model.arch.hidden_size: 64 -> 128" in str(error.value)
  assert "data.max_seq_len: 2048 -> 64" in str(error.value)
  assert "config.json" in str(error.value)

  # A run written before model.lora.modules_to_save existed resumes with its default, not a change.
  del record["config"]["model"]["lora"]["modules_to_save"]
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    json.dump(record, f)
  config_lib.check_run_config(run_dir, config)
  with pytest.raises(config_lib.ConfigError, match=r"model.lora.modules_to_save: \[\] -> \['lm_head'\]"):
    config_lib.check_run_config(run_dir, config_lib.load_config(
        config_file, [("model.lora.modules_to_save", "('lm_head',)")]))


@pytest.mark.parametrize("name", CFT_CONFIGS)
def test_shipped_configs_are_accepted_by_the_optimizer_and_data_pipeline(name):
  config = config_lib.load_config(os.path.join(REPO, "configs", name))
  tx, schedule = state.make_optimizer(config.optim, 100)
  assert float(schedule(50)) > 0
  if not config.data.train_path:
    config.data.train_path = "train.jsonl"
  pipeline.check_data(config.data)
  assert pipeline.host_batch_size(config.data.batch_size, 1) == config.data.batch_size
  specs = pipeline.source_specs(pipeline.train_sources(config.data))
  assert all(s["format"] in ("auto", *readers.KNOWN_FORMATS) for s in specs)


def test_warmstart_config_is_relative_to_the_config_file_that_sets_it(tmp_path):
  config_file = tmp_path / "exps" / "crl.py"
  config_file.parent.mkdir()
  config_file.write_text("from cftjax.config import base_config\n\n"
                         "def get_config():\n"
                         "  c = base_config()\n"
                         "  c.model.warmstart_config = '../cft/warm.py:0.5'\n"
                         "  return c\n")
  config = config_lib.load_config(str(config_file))
  assert config.model.warmstart_config == str(tmp_path / "cft" / "warm.py") + ":0.5"
  override = config_lib.load_config(str(config_file), [("model.warmstart_config", "cft.py")])
  assert override.model.warmstart_config == "cft.py"  # the command line: relative to the working directory
  shipped = config_lib.load_config(os.path.join(REPO, "configs", "demo_crl.py"))
  assert shipped.model.warmstart_config == os.path.join(REPO, "configs", "demo_cft.py")
  lora_demo = config_lib.load_config(os.path.join(REPO, "configs", "demo_cft_lora.py"))
  assert lora_demo.model.warmstart_config == os.path.join(REPO, "configs", "demo_cft_lora_base.py")


def test_deepcritic_recipe_runs_sft_then_rl_with_the_step_reward():
  sft = config_lib.load_config(os.path.join(REPO, "configs", "deepcritic_qwen2_5_7b_sft.py"))
  assert (sft.optim.lr, sft.data.num_epochs, sft.data.max_seq_len, sft.data.batch_size) == (1e-5, 3, 16384, 16)
  assert (sft.optim.schedule, sft.optim.warmup_ratio, sft.data.format) == ("cosine", 0.1, "deepcritic")
  rl = config_lib.load_config(os.path.join(REPO, "configs", "deepcritic_qwen2_5_7b.py"))
  assert rl.model.warmstart_config == os.path.join(REPO, "configs", "deepcritic_qwen2_5_7b_sft.py")
  assert rl.model.init_from_run == sft.train.run_dir
  spec, = pipeline.source_specs(pipeline.train_sources(rl.data))
  assert (spec["format"], spec["task"], spec["template"]) == ("prm800k", "step", "step_critique")
  with RewardComputer(rl.rl.rewards) as rewards:
    record = CritiqueRecord(question="q", steps=("a", "b"), error_step=1)
    assert [r.score for r in rewards([r"**Answer**: \boxed{2}", r"\boxed{1}"], [record] * 2,
                                     ["step"] * 2)] == [1.0, 0.0]
  suite = config_lib.load_config_file(os.path.join(REPO, rl.eval.suite))
  benches = [suites.Benchmark.from_config(name, entry.to_dict(), name)
             for name, entry in suite.benchmarks.items()]
  assert len(benches) == 4 and all(b.step_indexing == "deepcritic" for b in benches)
  assert all(b.prompt_template().name == "step_critique" for b in benches)
