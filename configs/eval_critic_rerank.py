"""A critic at work on an actor's math answers: reranking its samples and refining its answers.

  cftjax eval --config configs/eval_critic_rerank.py --ckpt CRITIC [--config.benchmarks.rerank.actor=ACTOR \
      --config.benchmarks.refine.actor=ACTOR]

CRITIC and ACTOR are cftjax model checkpoints or training run directories. The defaults are the CPU
demo's (README.md, "Critique data and a critic at work"): the actor warm start of
configs/demo_critique_grpo_sft.py sampled 4 times at T 1.0 on the two-digit world's 200 held-out
additions, judged by the critic of configs/demo_critic_from_data.py; point `path` at MATH-500 or any
math rows and `actor` at another model for a real run.
"""

from cftjax.eval.suites import base_suite_config, benchmark_entry

ACTOR = "runs/demo_critique_grpo/actor_warmstart"


def get_config():
  c = base_suite_config("critic_rerank")
  problems = "runs/demo_critique_grpo/world/rl_math_heldout.jsonl"
  c.benchmarks.rerank = benchmark_entry(problems, "critic_rerank", template="cft", verdict_style="cft",
                                        actor=ACTOR, n_samples=4, temperature=1.0, max_new_tokens=48,
                                        critic_max_new_tokens=80, pick="majority", limit=200)
  c.benchmarks.refine = benchmark_entry(problems, "critique_refine", template="cft", verdict_style="cft",
                                        actor=ACTOR, max_new_tokens=48, critic_max_new_tokens=80, rounds=2,
                                        limit=200)
  c.batch_size = 32
  return c
