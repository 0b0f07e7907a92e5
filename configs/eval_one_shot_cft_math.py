"""The six math benchmarks of One-Shot CFT (arXiv 2506.03295): MATH-500, Minerva Math, OlympiadBench,
AIME24, AIME25, AMC23. Qwen2.5-Math CoT prompt, greedy, last \\boxed{} graded by math-verify.

Put each benchmark's JSONL (published row shapes, docs/eval.md) under data/math_eval/, or point at it:

  cftjax eval --config configs/eval_one_shot_cft_math.py --ckpt converted/qwen2.5-math-7b \
      --config.benchmarks.math500.path=/data/math500/test.jsonl

Smoke run: --config.limit=16. Sampling (e.g. AIME avg@8): --config.benchmarks.aime24.temperature=0.6
--config.benchmarks.aime24.n_samples=8 --config.benchmarks.aime24.ks='(1,8)'.
"""

from cftjax.eval.suites import base_suite_config, benchmark_entry

# name -> file under data/math_eval/ (the paper's table order).
BENCHMARKS = (("math500", "math500.jsonl"), ("minerva_math", "minerva_math.jsonl"),
              ("olympiadbench", "olympiadbench.jsonl"), ("aime24", "aime24.jsonl"),
              ("aime25", "aime25.jsonl"), ("amc23", "amc23.jsonl"))
# Qwen2.5-Math-7B has a 4096-token context; prompts are short, so 3072 new tokens fit.
MAX_NEW_TOKENS = 3072


def get_config():
  c = base_suite_config("one_shot_cft_math")
  for name, file_name in BENCHMARKS:
    c.benchmarks[name] = benchmark_entry(f"data/math_eval/{file_name}", "math", template="math_cot",
                                         temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, ks=(1,))
  c.benchmarks_to_run = ",".join(name for name, _ in BENCHMARKS)
  c.batch_size = 64
  c.dtype = "bfloat16"  # compute (params stay float32); use --config.dtype=float32 on CPU
  c.cache_dtype = "bfloat16"
  c.grader_workers = 4
  return c
