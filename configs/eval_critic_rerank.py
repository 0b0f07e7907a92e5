"""A critic at work on an actor's math answers: reranking its samples and refining its answers.

  cftjax eval --config configs/eval_critic_rerank.py --ckpt CRITIC --config.benchmarks.rerank.actor=ACTOR \
      --config.benchmarks.refine.actor=ACTOR

CRITIC and ACTOR are cftjax model checkpoints or training run directories; the default problems are
the synthetic world's held-out additions (runs/demo_cft/world after `cftjax train --config
configs/demo_cft.py`); point `path` at MATH-500 or any math rows for a real run.
"""

from cftjax.eval.suites import base_suite_config, benchmark_entry


def get_config():
  c = base_suite_config("critic_rerank")
  problems = "runs/demo_cft/world/rl_math_heldout.jsonl"
  c.benchmarks.rerank = benchmark_entry(problems, "critic_rerank", template="cft", verdict_style="cft",
                                        n_samples=4, temperature=1.0, max_new_tokens=96,
                                        critic_max_new_tokens=96, pick="first", limit=100)
  c.benchmarks.refine = benchmark_entry(problems, "critique_refine", template="cft", verdict_style="cft",
                                        max_new_tokens=96, critic_max_new_tokens=96, rounds=2, limit=100)
  c.batch_size = 16
  return c
