"""Critics at work on an actor's math answers, for the eval kinds `critic_rerank` (the critic judges
each of the actor's samples and one is picked) and `critique_refine` (the actor answers, the critic
critiques, the actor refines). One call handles a group of examples through every stage and returns
their per-example records; the runner writes, resumes and summarises them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from cftjax.data import critique
from cftjax.data.critique import CritiqueRecord
from cftjax.eval import metrics as metrics_lib
from cftjax.eval.generation import Completion, Model, complete_all
from cftjax.eval.suites import Benchmark, Example
from cftjax.rewards.grading import MathGrader, extract_boxed


def _critic_settings(bench: Benchmark) -> Benchmark:
  """Greedy critiques up to critic_max_new_tokens."""
  return dataclasses.replace(bench, temperature=0.0, top_k=0, top_p=1.0,
                             max_new_tokens=bench.critic_max_new_tokens)


def _graded(bench: Benchmark, targets: Sequence[str], completions: Sequence[Completion], grader: MathGrader
            ) -> list[dict[str, Any]]:
  """{completion, prediction, correct, reason, num_tokens, truncated} of each actor completion."""
  grades = grader.grade_many([str(t) for t in targets], [c.text for c in completions])
  return [{"completion": c.text, "prediction": extract_boxed(c.text), "correct": ok, "reason": reason,
           "num_tokens": c.num_tokens, "truncated": c.truncated} for c, (ok, reason) in zip(completions, grades)]


def _critiques(bench: Benchmark, critic: Model, suite: Any, questions: Sequence[str],
               answers: Sequence[str]) -> list[tuple[str, bool | None]]:
  """(critique, parsed verdict) of each (question, answer), generated greedily by the critic."""
  template = bench.prompt_template()
  prompts = [critique.render_prompt(CritiqueRecord(question=q, solution=a), template, critic.tokenizer)
             for q, a in zip(questions, answers)]
  completions, _ = complete_all(critic, prompts, _critic_settings(bench), suite)
  return [(c.text, critique.parse_verdict(c.text, bench.verdict_style)) for c in completions]


def _actor_prompts(bench: Benchmark, actor: Model, examples: Sequence[Example]) -> list[np.ndarray]:
  template = critique.get_template(bench.actor_template)
  return [critique.render_prompt(e.record, template, actor.tokenizer) for e in examples]


def rerank_records(bench: Benchmark, actor: Model, critic: Model, suite: Any, grader: MathGrader,
                   indices: Sequence[int], examples: Sequence[Example]) -> list[dict[str, Any]]:
  """Per example: the actor's n_samples graded samples, each with the critic's critique and verdict,
  and `pick`, the index of the sample the critic picks (`metrics.pick_sample` with bench.pick)."""
  n = bench.n_samples
  prompts = _actor_prompts(bench, actor, examples)
  completions, _ = complete_all(actor, [p for p in prompts for _ in range(n)], bench, suite,
                                seed_offset=indices[0] * n if indices else 0)
  samples = _graded(bench, [e.target for e in examples for _ in range(n)], completions, grader)
  judged = _critiques(bench, critic, suite, [e.record.question for e in examples for _ in range(n)],
                      [s["completion"] for s in samples])
  for sample, (text, verdict) in zip(samples, judged):
    sample.update(critique=text, verdict=verdict)
  records = []
  for j, (index, example) in enumerate(zip(indices, examples)):
    mine = samples[j * n:(j + 1) * n]
    pick = metrics_lib.pick_sample([s["verdict"] for s in mine],
                                   [metrics_lib.vote_key(s["prediction"]) for s in mine], bench.pick)
    records.append({"index": index, "id": example.id, "prompt": actor.tokenizer.decode(prompts[j]),
                    "target": example.target, "samples": mine, "pick": pick})
  return records


def refine_records(bench: Benchmark, actor: Model, critic: Model, suite: Any, grader: MathGrader,
                   indices: Sequence[int], examples: Sequence[Example]) -> list[dict[str, Any]]:
  """Per example, `samples` holds the answer of each round 0..rounds: round 0 is the actor's answer;
  each round the critic critiques the current answer (`critique`, `verdict` on that round's entry) and
  the actor rewrites the answers judged wrong with bench.refine_template (`refined`: True); answers
  judged right, or with no verdict, are kept."""
  prompts = _actor_prompts(bench, actor, examples)
  completions, _ = complete_all(actor, prompts, bench, suite, seed_offset=indices[0] if indices else 0)
  targets = [e.target for e in examples]
  rounds = [[dict(s, refined=False)] for s in _graded(bench, targets, completions, grader)]
  refine_template = critique.get_template(bench.refine_template)
  questions = [e.record.question for e in examples]
  for r in range(1, bench.rounds + 1):
    current = [history[-1] for history in rounds]
    judged = _critiques(bench, critic, suite, questions, [s["completion"] for s in current])
    for sample, (text, verdict) in zip(current, judged):
      sample.update(critique=text, verdict=verdict)
    wrong = [j for j, (_, verdict) in enumerate(judged) if verdict is False]
    refine_prompts = [critique.render_prompt(
        CritiqueRecord(question=questions[j], solution=current[j]["completion"], critique=judged[j][0]),
        refine_template, actor.tokenizer) for j in wrong]
    refined, _ = complete_all(actor, refine_prompts, bench, suite, seed_offset=(indices[0] if indices else 0)
                              + r * len(indices))
    regraded = dict(zip(wrong, _graded(bench, [targets[j] for j in wrong], refined, grader)))
    for j, history in enumerate(rounds):
      kept = {k: v for k, v in current[j].items() if k not in ("critique", "verdict")}
      history.append(dict(regraded[j], refined=True) if j in regraded else dict(kept, refined=False))
  return [{"index": index, "id": e.id, "prompt": actor.tokenizer.decode(p), "target": e.target,
           "samples": history} for index, e, p, history in zip(indices, examples, prompts, rounds)]


def rerank_summary(bench: Benchmark, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """`metrics.rerank_metrics` of the records (`pick` recomputed from the stored verdicts), plus the
  critic's missing-verdict rate."""
  samples = [r["samples"] for r in records]
  summary: dict[str, Any] = metrics_lib.rerank_metrics(
      [[s["correct"] for s in ss] for ss in samples], [[s["verdict"] for s in ss] for ss in samples],
      [[metrics_lib.vote_key(s["prediction"]) for s in ss] for ss in samples], bench.pick)
  summary["critic_missing_rate"] = float(np.mean([s["verdict"] is None for ss in samples for s in ss]))
  return summary


def refine_summary(bench: Benchmark, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """`metrics.refine_metrics` of the records, and per round r >= 1 the fraction of answers refined."""
  summary: dict[str, Any] = metrics_lib.refine_metrics([[s["correct"] for s in r["samples"]] for r in records])
  for r in range(1, bench.rounds + 1):
    summary[f"refined_rate_round_{r}"] = float(np.mean([rec["samples"][r]["refined"] for rec in records]))
  return summary
