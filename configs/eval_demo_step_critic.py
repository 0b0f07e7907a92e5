"""Demo: ProcessBench-style earliest-error F1 of the step-level critic of configs/demo_step_critic.py
on the synthetic world's 300 held-out step-labelled solutions (ProcessBench rows, DeepCritic's 1-based
"\\boxed{k}"), greedy, on a laptop CPU.

  cftjax eval --config configs/eval_demo_step_critic.py --ckpt RUN_DIR
"""

from cftjax.data.synthetic import STEP_CRITIC_TEMPLATE
from cftjax.eval.suites import base_suite_config, benchmark_entry

WORLD_DIR = "runs/demo_step_critic/world"


def get_config():
  c = base_suite_config("demo_step_critic")
  c.benchmarks["steps"] = benchmark_entry(f"{WORLD_DIR}/step_heldout_processbench.jsonl",
                                          "processbench", template=dict(STEP_CRITIC_TEMPLATE),
                                          step_indexing="deepcritic", max_new_tokens=80)
  c.batch_size = 100
  c.tokenizer_dir = WORLD_DIR + "/tokenizer"  # used only when the checkpoint has no tokenizer/
  return c
