"""The `critic` reward: a frozen critic checkpoint in process (parsed verdicts, and p(right) from its
logits checked against the two-way softmax computed in float64) and the same critic behind a real
`cftjax serve` subprocess asked through the official openai client, mixed with other rewards in one
RewardComputer."""

from __future__ import annotations

import math

import pytest

from cftjax.data import critique, synthetic
from cftjax.data.critique import CritiqueRecord
from cftjax.rewards import registry
from cftjax.rewards.critic import critic_for
from cftjax.tokenizer import Tokenizer
from tests.chain_models import save_chain_model
from tests.served import start_server, stop_server

# The critic's verdict-slot logits: lm_head entries after "Conclusion:" for " right" and " wrong".
RIGHT_ENTRY, WRONG_ENTRY = 0.15, 0.10


@pytest.fixture(scope="module")
def critics(tmp_path_factory):
  root = tmp_path_factory.mktemp("critic_reward")
  world = synthetic.write_world(str(root / "world"), num_train=20, num_heldout=4)
  tokenizer = Tokenizer.from_dir(world["tokenizer"])
  prompt_end = list(critique.render_prompt(CritiqueRecord(question="q", solution="s"), "cft", tokenizer))
  colon, right, wrong = (tokenizer.encode(t)[0] for t in (":", " right", " wrong"))
  right_critic, wrong_critic = str(root / "right"), str(root / "wrong")
  save_chain_model(right_critic, world["tokenizer"], prompt_end, "Conclusion: right [END]",
                   logits={(colon, right): RIGHT_ENTRY, (colon, wrong): WRONG_ENTRY})
  save_chain_model(wrong_critic, world["tokenizer"], prompt_end, "Conclusion: wrong [END]")
  return right_critic, wrong_critic, tokenizer.vocab_size


RECORDS = [CritiqueRecord(question="What is 2 + 3?", reference_answer="5", id="a"),
           CritiqueRecord(question="What is 1 + 1?", reference_answer="2", id="b")]
COMPLETIONS = ["<think>hmm</think>So \\boxed{5}", "So \\boxed{3}"]


def test_in_process_verdicts_and_probability(critics):
  right_critic, wrong_critic, hidden = critics
  verdicts = registry.score_batch("critic", COMPLETIONS, RECORDS, ckpt=right_critic, verdict_style="cft",
                                  max_new_tokens=12, batch_size=2)
  assert [(r.score, r.reason) for r in verdicts] == [(1.0, "critic verdict: right")] * 2
  probs = registry.score_batch("critic", COMPLETIONS, RECORDS, ckpt=right_critic, verdict_style="cft",
                               score="probability", max_new_tokens=12, batch_size=2)
  # One-hot hidden state after the final RMSNorm: 1 / sqrt(1 / hidden + eps); p = softmax of two logits.
  norm = 1.0 / math.sqrt(1.0 / hidden + 1e-6)
  expected = 1.0 / (1.0 + math.exp(-(RIGHT_ENTRY - WRONG_ENTRY) * norm))
  assert 0.6 < expected < 0.9
  assert [r.score for r in probs] == pytest.approx([expected] * 2, rel=1e-5)
  wrong = registry.score_batch("critic", COMPLETIONS[:1], RECORDS[:1], ckpt=wrong_critic, verdict_style="cft",
                               score="probability", max_new_tokens=12, batch_size=2)
  assert wrong[0].score < 1e-6 and not wrong[0].error


def test_bad_options_are_named(critics):
  right_critic, _, _ = critics
  [both] = registry.score_batch("critic", COMPLETIONS[:1], RECORDS[:1], ckpt=right_critic, endpoint="http://x/v1")
  assert both.error and "set exactly one of options.critic.ckpt" in both.reason
  [unknown] = registry.score_batch("critic", COMPLETIONS[:1], RECORDS[:1], ckpt=right_critic, concurrency=2)
  assert unknown.error and "unknown option(s) ['concurrency']" in unknown.reason
  [style] = registry.score_batch("critic", COMPLETIONS[:1], RECORDS[:1], ckpt=right_critic, score="probability")
  assert style.error and "needs verdict_style in ['cft', 'crl']" in style.reason


@pytest.fixture(scope="module")
def served_wrong_critic(critics):
  _, wrong_critic, _ = critics
  base, proc = start_server(wrong_critic, "--batch-window-ms", "200", "--max-batch", "4")
  yield f"{base}/v1"
  stop_server(proc)


def test_endpoint_critic_with_other_rewards(critics, served_wrong_critic):
  _, wrong_critic, _ = critics
  config = {"by_task": {"math": "critic", "crl": "verdict"}, "scale_by_source": {"crl": 0.5},
            "options": {"critic": {"endpoint": served_wrong_critic, "verdict_style": "cft", "max_new_tokens": 12,
                                   "concurrency": 2}}}
  crl = CritiqueRecord(question="q", solution="s", label=False, source="crl", id="c")
  with registry.RewardComputer(config) as rewards:
    results = rewards([*COMPLETIONS, "Conclusion: wrong [END]"], [*RECORDS, crl], ["math", "math", "crl"])
  assert [(r.score, r.reason) for r in results] == [
      (0.0, "critic verdict: wrong"), (0.0, "critic verdict: wrong"), (0.5, "verdict matches label")]
  assert rewards.error_count == 0
  # The served critic and the same checkpoint in process write the same critiques.
  served = critic_for(endpoint=served_wrong_critic, verdict_style="cft", max_new_tokens=12, concurrency=2)
  local = critic_for(ckpt=wrong_critic, verdict_style="cft", max_new_tokens=12, batch_size=2)
  questions, solutions = [r.question for r in RECORDS], ["So \\boxed{5}", "So \\boxed{3}"]
  assert [j.critique for j in served.judge(questions, solutions)] == \
         [j.critique for j in local.judge(questions, solutions)] == ["Conclusion: wrong [END]"] * 2
  [prob] = registry.score_batch("critic", COMPLETIONS[:1], RECORDS[:1], endpoint=served_wrong_critic,
                                score="probability")
  assert prob.error and "an endpoint critic scores verdicts only" in prob.reason
