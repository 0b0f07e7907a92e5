"""Critique-GRPO refinements on a hand-built example: which groups are refined, the second prompt the
policy sees (question + previous response + critique), the verdict-agreement filter of model-written
critiques, the preference for correct refinements, their metrics, and the update batch they make
(tokens of the ORIGINAL prompt + refinement, refined_mask, weights, advantages r - mean)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cftjax import config as config_lib
from cftjax.data.critique import CritiqueRecord, render_prompt, rule_critique
from cftjax.rewards.registry import RewardComputer
from cftjax.tokenizer import Tokenizer
from cftjax.train import losses, refinement, rollout
from tests.tokenizer_fixtures import write_qwen_dir

TEMPLATE = {"system": "", "user": "{question}\nPrevious: {solution}\nFeedback: {critique}"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return Tokenizer.from_dir(str(write_qwen_dir(tmp_path_factory.mktemp("tok"))))


def rl_section(**refinement_fields):
  config = config_lib.base_config()
  config.rl.max_new_tokens = 16
  config.rl.max_prompt_len = 256
  config.rl.refinement.update(refinement_fields)
  config.rl.refinement.template = TEMPLATE
  return config.rl


class Scripted:
  """A stand-in for the sampler (not under test): each call answers its rows with the next scripted
  list of texts (rows past the list, the refiner's padding, repeat its last text), with log-probs
  -0.1 * (1 + token index); it records each call's decoded prompt rows."""

  def __init__(self, tokenizer, calls):
    self.tokenizer, self.calls, self.prompts = tokenizer, list(calls), []

  def __call__(self, rows, max_new_tokens, rng):
    del rng
    script = self.calls.pop(0)
    assert len(rows) >= len(script)
    self.prompts.append([self.tokenizer.decode(r) for r in rows])
    texts = script + [script[-1]] * (len(rows) - len(script))
    tokens = [np.asarray(self.tokenizer.encode(t) + [self.tokenizer.eos_ids[0]], np.int32)[:max_new_tokens]
              for t in texts]
    return tokens, [-0.1 * np.arange(1, len(t) + 1, dtype=np.float32) for t in tokens], np.zeros(len(rows), bool)


def scored_groups(tokenizer, rewards):
  """Two math groups: 'What is 2 + 3?' with three wrong answers, 'What is 4 + 4?' with one right."""
  groups = []
  for question, answer, texts in (("What is 2 + 3?", "5", ["\\boxed{4}", "\\boxed{6}", "\\boxed{7}"]),
                                  ("What is 4 + 4?", "8", ["\\boxed{8}", "\\boxed{9}", "\\boxed{7}"])):
    record = CritiqueRecord(question=question, reference_answer=answer)
    prompt = {"prompt_ids": render_prompt(record, "math_cot", tokenizer), "record": record,
              "source": "s", "task": "math"}
    completions = [np.asarray(tokenizer.encode(t) + [tokenizer.eos_ids[0]], np.int32) for t in texts]
    groups.append(rollout.Group(prompt, completions, [np.full(len(c), -1.0, np.float32) for c in completions],
                                np.zeros(3, bool)))
  rollout.score_groups(groups, rewards, tokenizer, max_new_tokens=16)
  return groups


@pytest.fixture(scope="module")
def rewards():
  with RewardComputer(config_lib.base_config().rl.rewards) as computer:
    yield computer


def test_simple_gt_refinements_join_the_failed_group_and_make_the_update_batch(tokenizer, rewards):
  rl = rl_section(when="all_failed", critique="simple_gt", num_refinements=1)
  groups = scored_groups(tokenizer, rewards)
  np.testing.assert_array_equal([g.scores for g in groups], [[0, 0, 0], [1, 0, 0]])
  policy = Scripted(tokenizer, [["\\boxed{6}", "\\boxed{5}", "\\boxed{5}"]])

  def score(gs):
    rollout.score_groups(gs, rewards, tokenizer, max_new_tokens=16)

  refiner = refinement.Refiner(rl, tokenizer, policy, score, seed=0)
  refiner.refine(groups, jax.random.key(0))
  # The second prompt: question + each previous response + its rule-based critique, first group only.
  critique = rule_critique(False, "5")
  expected = [tokenizer.decode(render_prompt(CritiqueRecord(
      question="What is 2 + 3?", solution=text, critique=critique), refinement.refinement_template(rl),
      tokenizer)) for text in ("\\boxed{4}", "\\boxed{6}", "\\boxed{7}")]
  assert len(policy.prompts[0]) == 4  # 3 rows padded to a power of two (one compiled shape)
  assert policy.prompts[0][:3] == expected and "The reference answer is 5." in expected[0]
  failed, solved = groups
  assert len(solved.completions) == 3 and not solved.refined.any()
  assert failed.refined.tolist() == [False, False, False, True]
  assert failed.texts[3] == "\\boxed{5}" and failed.scores[3] == 1.0  # a correct one is preferred
  metrics = refiner.take_metrics()
  assert metrics["refine/groups_refined_fraction"] == 0.5
  assert metrics["refine/success_rate"] == pytest.approx(2 / 3)
  assert (metrics["refine/initial_reward_mean"], metrics["refine/added_reward_mean"]) == (0.0, 1.0)
  assert refiner.take_metrics()["refine/refinements"] == 0.0  # taken: reset

  rewards_, group_ids = rollout.group_rewards(groups)
  advantages = np.asarray(losses.group_advantages(rewards_, group_ids=group_ids, scale="none"))
  np.testing.assert_allclose(advantages, [-0.25, -0.25, -0.25, 0.75] + [2 / 3, -1 / 3, -1 / 3])
  batch = rollout.build_update_batch(groups, advantages, 8, pad_id=0)
  prompt = failed.prompt["prompt_ids"]
  refined_tokens = failed.completions[3]
  start, end = len(prompt), len(prompt) + len(refined_tokens)
  row = 3  # the refinement: the ORIGINAL prompt, then the refinement's tokens
  np.testing.assert_array_equal(batch["inputs"][row, :start], prompt)
  np.testing.assert_array_equal(batch["targets"][row, start - 1:end - 1], refined_tokens)
  expected_mask = np.zeros(batch["targets"].shape[1], np.float32)
  expected_mask[start - 1:end - 1] = 1.0
  for key, scale in (("completion_mask", 1.0), ("refined_mask", 1.0), ("token_weights", 1.0),
                     ("advantages", 0.75)):
    np.testing.assert_allclose(batch[key][row], scale * expected_mask, err_msg=key)
  np.testing.assert_allclose(batch["old_logp"][row, start - 1:end - 1],
                             -0.1 * np.arange(1, len(refined_tokens) + 1), rtol=1e-6)
  assert not batch["refined_mask"][[0, 1, 2, 4, 5, 6, 7]].any()  # initial responses, padding row
  np.testing.assert_allclose(batch["advantages"][0].sum(), -0.25 * batch["completion_mask"][0].sum())
  assert not batch["completion_mask"][7].any()


def test_model_critiques_are_kept_only_when_their_verdict_agrees(tokenizer, rewards):
  rl = rl_section(when="always", critique="policy", critique_template="cft", verdict_style="cft",
                  num_refinements=2)
  groups = scored_groups(tokenizer, rewards)
  # Critiques of the 6 responses (scores 0 0 0 / 1 0 0): agree, disagree, no verdict / agree x3.
  critiques = ["Conclusion: wrong", "Conclusion: right", "no idea", "Conclusion: right",
               "Conclusion: wrong", "Conclusion: wrong"]
  policy = Scripted(tokenizer, [critiques, ["\\boxed{5}", "\\boxed{9}", "\\boxed{8}", "\\boxed{8}"]])
  refiner = refinement.Refiner(
      rl, tokenizer, policy, lambda gs: rollout.score_groups(gs, rewards, tokenizer, max_new_tokens=16))
  refiner.refine(groups, jax.random.key(0))
  assert len(policy.prompts[0]) == 8  # 6 critique prompts, padded to a power of two
  assert "What is 2 + 3?" in policy.prompts[0][0] and "\\boxed{4}" in policy.prompts[0][0]
  refine_prompts = policy.prompts[1]
  assert len(refine_prompts) == 4  # 1 kept in the first group, 3 in the second
  assert "Feedback: Conclusion: wrong" in refine_prompts[0] and "\\boxed{4}" in refine_prompts[0]
  assert [g.refined.sum() for g in groups] == [1, 2]
  assert groups[1].texts[3:] == ["\\boxed{8}", "\\boxed{8}"]  # the correct ones, not \boxed{9}
  metrics = refiner.take_metrics()
  assert metrics["refine/critiques_kept_fraction"] == pytest.approx(4 / 6)
  assert metrics["refine/groups_refined_fraction"] == 1.0


def test_bad_refinement_settings_name_the_key():
  with pytest.raises(config_lib.ConfigError, match="rl.refinement.critique="):
    refinement.check_settings(rl_section(when="always", critique="gpt4"))
  with pytest.raises(config_lib.ConfigError, match="rl.refinement.critic_run"):
    refinement.check_settings(rl_section(when="always", critique="critic"))
  with pytest.raises(config_lib.ConfigError, match="rl.refinement.when="):
    refinement.check_settings(rl_section(when="sometimes"))
  rl = rl_section(when="always")
  rl.refinement.template = {"user": "{question} {answer}"}
  with pytest.raises(config_lib.ConfigError, match="rl.refinement.template.*answer"):
    refinement.check_settings(rl)
  assert refinement.rows_per_group(rl_section(when="off")) == 8
  assert refinement.rows_per_group(rl_section(when="all_failed", num_refinements=2)) == 10
