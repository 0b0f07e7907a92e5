"""Demo: pass rate of the synthetic world's actor (configs/demo_critique_grpo.py) on held-out additions,
split into those with a carry into the leading column (the actor's persistently failed kind) and
those without; sampled pass@1 at temperature 1.0 (4 samples per problem), on a laptop CPU.

  cftjax eval --config configs/eval_demo_critique_grpo.py --ckpt RUN_DIR
"""

from cftjax.eval.suites import base_suite_config, benchmark_entry

WORLD_DIR = "runs/demo_critique_grpo/world"


def get_config():
  c = base_suite_config("demo_critique_grpo")
  for name in ("carry", "nocarry"):
    c.benchmarks[name] = benchmark_entry(f"{WORLD_DIR}/rl_math_heldout_{name}.jsonl", "math",
                                         template="math_cot", n_samples=4, temperature=1.0,
                                         max_new_tokens=32)
  c.batch_size = 64
  c.tokenizer_dir = WORLD_DIR + "/tokenizer"  # used only when the checkpoint has no tokenizer/
  return c
