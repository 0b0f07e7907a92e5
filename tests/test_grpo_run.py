"""Tests for GRPO rollouts and the GRPO trainer: DAPO overlong penalty and dynamic sampling counts,
the update batch layout, and a few-step smoke run on the synthetic world (RL + CRL sources, KL on)
that writes every promised metric and a checkpoint it resumes from."""

from __future__ import annotations

import json
import os

import jax
from ml_collections import config_dict
import numpy as np
import pytest

from cftjax import config as config_lib
from cftjax.data import synthetic
from cftjax.eval import runner
from cftjax import launch
from cftjax.config import base_config
from cftjax.train import rollout

# ------------------------------------------------------------------------------------------------
# Rollout pieces.


def test_overlong_penalty_is_dapo_soft_punishment():
  lengths = np.array([0, 12, 13, 16, 20])
  # max 20 tokens, buffer 8: free up to 12, then (12 - len) / 8, reaching -1 at 20.
  np.testing.assert_allclose(rollout.overlong_penalty(lengths, 20, 8),
                             [0.0, 0.0, -0.125, -0.5, -1.0])
  np.testing.assert_allclose(rollout.overlong_penalty(lengths, 20, 8, factor=0.5)[-1], -0.5)
  assert not rollout.overlong_penalty(lengths, 20, 0).any()
  with pytest.raises(ValueError, match="overlong_buffer=30 exceeds rl.max_new_tokens=20"):
    rollout.overlong_penalty(lengths, 20, 30)


def make_group(prompt_len: int, rewards, source: str = "s", completion_len: int = 3) -> rollout.Group:
  size = len(rewards)
  group = rollout.Group(
      prompt={"prompt_ids": np.arange(1, prompt_len + 1, dtype=np.int32), "record": None,
              "source": source, "task": "crl"},
      completions=[np.full(completion_len, 9, np.int32)] * size,
      logprobs=[np.full(completion_len, -0.5, np.float32)] * size,
      truncated=np.array([i == 0 for i in range(size)]))
  group.scores = group.rewards = np.asarray(rewards, np.float32)
  return group


def test_dynamic_sampling_drops_equal_reward_groups_and_draws_more():
  # Draw d yields groups with rewards: draw 0 two flat + one varied; draw 1 two varied; draw 2 one.
  planned = [[[1, 1], [0, 0], [0, 1]], [[1, 0], [0, 1]], [[1, 0]]]
  draws = iter(planned)

  def sample(prompts, draw):  # a "prompt" here is the rewards its group will get
    del draw
    return [make_group(4, r) for r in prompts]

  result = rollout.collect_rollout(lambda: next(draws), sample, lambda groups: None,
                                   prompts_per_step=2, dynamic_sampling=True, max_draws=3)
  assert (result.draws, result.dropped_zero_std, result.surplus, result.missing) == (2, 2, 1, 0)
  assert len(result.groups) == 2 and len(result.sampled) == 5
  assert all(g.has_reward_variance for g in result.groups)
  metrics = rollout.rollout_metrics(result, group_size=2)
  assert metrics["zero_std_fraction"] == pytest.approx(2 / 5)
  assert metrics["reward_mean"] == pytest.approx(0.5) and metrics["reward_mean/s"] == pytest.approx(0.5)

  draws = iter([[[1, 1], [0, 0]], [[0, 0], [1, 1]]])
  short = rollout.collect_rollout(lambda: next(draws), sample, lambda groups: None,
                                  prompts_per_step=2, dynamic_sampling=True, max_draws=2)
  assert (short.draws, short.dropped_zero_std, short.missing, len(short.groups)) == (2, 4, 2, 0)
  draws = iter([[[1, 1], [0, 0]]])
  plain = rollout.collect_rollout(lambda: next(draws), sample, lambda groups: None,
                                  prompts_per_step=2, dynamic_sampling=False, max_draws=5)
  assert (plain.draws, len(plain.groups), plain.dropped_zero_std) == (1, 2, 0)


def test_update_batch_layout_and_truncation_mask():
  groups = [make_group(4, [1, 0]), make_group(6, [0, 1], completion_len=5)]
  advantages = np.array([1, -1, -1, 1], np.float32)
  batch = rollout.build_update_batch(groups, advantages, 6, mask_truncated=True, seq_buckets=(12,))
  assert batch["inputs"].shape == (6, 12)
  targets = [slice(3, 6)] * 2 + [slice(5, 10)] * 2  # each completion's targets
  for row, (cols, value) in enumerate(zip(targets, advantages)):  # truncated rows keep advantages
    expected = np.zeros(12, np.float32)
    expected[cols] = value
    np.testing.assert_array_equal(batch["advantages"][row], expected)
    np.testing.assert_array_equal(batch["token_weights"][row], expected != 0)
  assert not batch["advantages"][4:].any() and not batch["refined_mask"].any()
  np.testing.assert_array_equal(batch["targets"][1, 3:6], [9, 9, 9])  # completion after 4 prompt ids
  np.testing.assert_array_equal(batch["completion_mask"][1], [0, 0, 0, 1, 1, 1] + [0] * 6)
  assert not batch["completion_mask"][0].any() and not batch["completion_mask"][2].any()  # truncated
  np.testing.assert_array_equal(batch["old_logp"][3, 5:10], [-0.5] * 5)
  np.testing.assert_array_equal(batch["segment_ids"][3], [1] * 10 + [0] * 2)
  assert not batch["segment_ids"][4:].any()


# ------------------------------------------------------------------------------------------------
# The trainer.

REQUIRED_TRAIN_METRICS = (
    "reward_mean", "reward_std", "reward_mean/crl", "reward_mean/math", "zero_std_fraction", "kl",
    "entropy", "clip_frac_low", "clip_frac_high", "completion_len_mean", "completion_len_min",
    "completion_len_max", "truncated_fraction", "logp_gap", "pg_loss", "loss", "grad_norm", "lr",
    "tokens_per_s", "time_rollout_s", "time_reward_s", "time_reference_s", "time_update_s",
    "groups_dropped_zero_std", "draws")


def smoke_config(world: str, run_dir: str, steps: int):
  c = base_config()
  c.train.objective = "grpo"
  c.eval.loss_batches = 0
  c.train.run_dir = run_dir
  c.train.steps = steps
  c.model.tokenizer_dir = os.path.join(world, "tokenizer")
  c.model.arch.hidden_size = 32
  c.model.arch.intermediate_size = 64
  c.model.arch.num_layers = 1
  c.model.arch.num_heads = 2
  c.model.arch.num_kv_heads = 1
  c.model.arch.max_position_embeddings = 512
  c.data.sources = (
      {"path": os.path.join(world, "rl_crl_train.jsonl"), "task": "crl", "template": "crl",
       "name": "crl", "weight": 0.2},
      {"path": os.path.join(world, "rl_math_train.jsonl"), "task": "math", "template": "math_cot",
       "name": "math", "weight": 0.8})
  c.data.eval_path = os.path.join(world, "rl_crl_heldout.jsonl")
  c.data.template = "crl"
  c.data.eval_template = "crl"  # the sources' templates differ: the held-out rows are CRL rows
  c.data.batch_size = 4  # prompts per step; x 2 samples = 8 rows = the 8 fake devices
  c.rl.group_size = 2
  c.rl.max_new_tokens = 6
  c.rl.max_prompt_len = 256
  c.rl.kl_coef = 0.01
  c.rl.overlong_buffer = 2
  c.rl.rewards.options.verdict.style = "crl"
  c.optim.lr = 1e-3
  c.optim.warmup_ratio = 0.0
  c.mesh.data = -1
  c.mesh.fsdp = 2
  c.eval.verdict_examples = 4
  c.eval.batch_size = 4
  c.eval.max_new_tokens = 6
  c.checkpoint.every_steps = 1
  c.checkpoint.async_save = False
  c.logging.every_steps = 1
  c.logging.tensorboard = False
  c.logging.progress_bar = False
  return c


def test_grpo_smoke_run_writes_metrics_and_resumes(tmp_path):
  world = str(tmp_path / "world")
  synthetic.write_world(world, num_train=40, num_heldout=8)
  run_dir = str(tmp_path / "run")
  summary = launch.train(smoke_config(world, run_dir, steps=2))
  assert (summary["start_step"], summary["steps"]) == (0, 2)
  assert set(summary["initial_eval"]) >= {"verdict_accuracy", "verdict_missing_rate"}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [1, 2]
  for row in train_rows:
    missing = [k for k in REQUIRED_TRAIN_METRICS if k not in row]
    assert not missing, f"metrics.jsonl lacks {missing}"
    assert 0.0 <= row["truncated_fraction"] <= 1.0 and row["completion_len_max"] <= 6
    assert row["draws"] == 1.0 and np.isfinite(row["loss"])
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["1", "2"]

  resumed = launch.train(smoke_config(world, run_dir, steps=3))
  assert (resumed["start_step"], resumed["steps"]) == (2, 3)
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if '"train"' in line]
  assert steps == [1, 2, 3]
  assert "3" in os.listdir(os.path.join(run_dir, "checkpoints"))


TINY_CFT_CONFIG = '''
from cftjax.config import base_config

def get_config():
  c = base_config()
  c.data.synthetic_world = True
  c.data.template = "cft"
  c.data.max_seq_len = 128
  c.data.batch_size = 8
  c.data.packing = False
  for key, value in dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=16, max_position_embeddings=256).items():
    c.model.arch[key] = value
  c.optim.lr = 1e-3
  c.train.steps = 6
  c.checkpoint.best_metric = "verdict_accuracy"
  c.checkpoint.best_mode = "max"
  c.checkpoint.async_save = False
  c.eval.every_steps = 3
  c.eval.verdict_examples = 8
  c.eval.batch_size = 8
  c.eval.max_new_tokens = 6
  c.eval.verdict_style = "cft"
  c.logging.tensorboard = False
  c.logging.progress_bar = False
  return c
'''


def test_grpo_warm_starts_from_a_cft_config_and_its_run_dir_evaluates(tmp_path):
  """model.warmstart_config trains the CFT run first (in the GRPO run's world); the GRPO run starts from
  its best params, and `cftjax eval` loads the GRPO run dir with the CFT run's architecture."""
  cft_config = tmp_path / "tiny_cft.py"
  cft_config.write_text(TINY_CFT_CONFIG)
  world = str(tmp_path / "world")
  c = smoke_config(world, str(tmp_path / "grpo"), steps=1)
  c.model.tokenizer_dir = ""
  c.data.synthetic_world = True
  c.data.world_dir = world
  c.data.world.num_train = 40
  c.data.world.num_heldout = 8
  c.data.world.teacher_leading_carry_slip = 0.5
  c.data.template = "cft"
  c.data.sources = ({"path": os.path.join(world, "rl_crl_train.jsonl"), "task": "crl",
                     "template": "cft", "name": "crl"},)
  c.data.eval_path = os.path.join(world, "heldout.jsonl")
  c.rl.rewards.options.verdict.style = "cft"
  c.eval.verdict_style = "cft"
  c.model.init_from_run = str(tmp_path / "cft")
  c.model.warmstart_config = str(cft_config)
  c.model.warmstart_steps = 4
  c.checkpoint.best_metric = "verdict_accuracy"
  c.checkpoint.best_mode = "max"
  summary = launch.train(c)

  with open(os.path.join(tmp_path, "cft", "summary.json")) as f:
    cft_summary = json.load(f)
  with open(os.path.join(tmp_path, "cft", "config.json")) as f:
    cft_run_config = json.load(f)["config"]
  assert cft_summary["steps"] == 4
  assert cft_run_config["data"]["world"]["teacher_leading_carry_slip"] == 0.5
  assert cft_run_config["data"]["world_dir"] == world
  assert summary["steps"] == 1

  eval_config = config_dict.ConfigDict({"dtype": "", "tokenizer_dir": ""})
  model_cfg, grpo_params, _ = runner.load_for_eval(str(tmp_path / "grpo"), eval_config)
  assert (model_cfg.hidden_size, model_cfg.num_layers) == (32, 1)
  _, cft_params, _ = runner.load_for_eval(str(tmp_path / "cft"), eval_config)
  # the policy started from the CFT best params: at most one AdamW step (lr 1e-3) away from them
  distance = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(grpo_params),
                                                               jax.tree.leaves(cft_params)))
  assert distance <= 2e-3

  # a warm start trained on an older version of this world directory is refused, not reused
  cft_config_path = os.path.join(tmp_path, "cft", "config.json")
  with open(cft_config_path) as f:
    record = json.load(f)
  record["config"]["data"]["world"]["teacher_leading_carry_slip"] = 0.0
  with open(cft_config_path, "w") as f:
    json.dump(record, f)
  c.train.run_dir = str(tmp_path / "grpo_again")
  with pytest.raises(config_lib.ConfigError, match="model.init_from_run=.*other data.world settings"):
    launch.train(c)


def test_critique_grpo_two_step_smoke_run(tmp_path):
  """Two Critique-GRPO steps end to end (simple_gt critiques, one refinement per group, centred
  advantages, entropy bonus, truncated IS against recomputed old log-probs): the update batch has
  refinement rows and the run logs the refine/* metrics."""
  world = str(tmp_path / "world")
  synthetic.write_world(world, num_train=40, num_heldout=8)
  c = smoke_config(world, str(tmp_path / "run"), steps=2)
  c.data.sources = ({"path": os.path.join(world, "rl_math_train.jsonl"), "task": "math",
                     "template": "math_cot", "name": "math"},)
  c.rl.group_size = 3  # + 1 refinement = 4 rows per prompt, 16 rows over the 8 fake devices
  c.rl.kl_coef = 0.0
  c.rl.advantage_scale = "none"
  c.rl.entropy_coef = 1e-3
  c.rl.recompute_old_logp = True
  c.rl.tis_cap = 2.0
  c.rl.refinement.when = "always"
  c.rl.refinement.critique = "simple_gt"
  summary = launch.train(c)
  assert summary["steps"] == 2
  with open(os.path.join(str(tmp_path / "run"), "metrics.jsonl")) as f:
    train_rows = [r for r in map(json.loads, f) if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [1, 2]
  for row in train_rows:
    assert row["refine/groups_refined_fraction"] == 1.0 and row["refine/refinements"] == 12.0
    assert row["refine/refinements_added"] == 4.0 and 0 < row["refined_token_fraction"] < 1
    assert 0 < row["token_weight_mean"] <= 2.0 and np.isfinite(row["loss"])
    assert np.isfinite(row["entropy_loss"]) and row["entropy_loss"] < 0


STEP_SUITE_CONFIG = '''
from cftjax.data.synthetic import STEP_CRITIC_TEMPLATE
from cftjax.eval.suites import base_suite_config, benchmark_entry

def get_config():
  c = base_suite_config("step_smoke")
  c.benchmarks["steps"] = benchmark_entry({path!r}, "processbench", template=dict(STEP_CRITIC_TEMPLATE),
                                          step_indexing="deepcritic", max_new_tokens=6)
  c.batch_size = 4
  return c
'''


def test_step_critic_two_step_smoke_run(tmp_path):
  """Two GRPO steps of a step-level critic (the `step` reward, DeepCritic indexing) on the synthetic
  world's step-labelled rows, with the ProcessBench-style suite at every eval: finite metrics, both
  checkpoints, the suite's F1 before and after, a summary."""
  world = str(tmp_path / "world")
  synthetic.write_world(world, num_train=40, num_heldout=8, step_solutions=True)
  suite = tmp_path / "eval_steps.py"
  suite.write_text(STEP_SUITE_CONFIG.format(path=os.path.join(world, "step_heldout_processbench.jsonl")))
  run_dir = str(tmp_path / "run")
  c = smoke_config(world, run_dir, steps=2)
  c.data.sources = ({"path": os.path.join(world, "rl_step_train.jsonl"), "task": "step",
                     "template": synthetic.STEP_CRITIC_TEMPLATE, "name": "steps"},)
  c.data.template = synthetic.STEP_CRITIC_TEMPLATE
  c.data.eval_template = synthetic.STEP_CRITIC_TEMPLATE
  c.data.eval_path = os.path.join(world, "step_heldout.jsonl")
  c.rl.kl_coef = 0.0
  c.rl.overlong_buffer = 0  # rewards stay the step reward's 0 / 1
  c.rl.rewards.by_task = {"step": "step"}
  c.rl.rewards.options = {"step": {"indexing": "deepcritic"}}
  c.eval.verdict_examples = 0
  c.eval.suite = str(suite)
  c.eval.suite_limit = 0
  c.eval.every_steps = 2
  summary = launch.train(c)
  assert (summary["start_step"], summary["steps"]) == (0, 2)
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [1, 2]
  for row in train_rows:
    assert 0.0 <= row["reward_mean/steps"] <= 1.0
    assert all(np.isfinite(row[k]) for k in ("loss", "pg_loss", "entropy", "grad_norm", "reward_mean"))
  evals = [r for r in rows if "steps/f1" in r]
  assert [r["step"] for r in evals] == [0, 2]
  assert all(0.0 <= r["steps/f1"] <= 1.0 and 0.0 <= r["steps/missing_rate"] <= 1.0 for r in evals)
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["1", "2"]
  assert {"config.json", "metrics.jsonl", "summary.json"} <= set(os.listdir(run_dir))
