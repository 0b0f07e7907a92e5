"""ProcessBench earliest-error F1 of a step-level critic trained in DeepCritic's convention (steps as
tagged paragraphs numbered from 1, "**Answer**: \\boxed{k}", -1 = no wrong step): the four
ProcessBench subsets with the step_critique template, greedy.

  cftjax eval --config configs/eval_step_critic.py --ckpt DIR

ProcessBench's n-sample majority vote, e.g. 8 samples: --config.benchmarks.processbench_gsm8k.n_samples=8
--config.benchmarks.processbench_gsm8k.temperature=0.7 --config.benchmarks.processbench_gsm8k.ks=1,8
adds maj@8_f1 / maj@8_error_acc / maj@8_correct_acc (docs/eval.md).
"""

from cftjax.eval.suites import base_suite_config, benchmark_entry

PROCESSBENCH_SPLITS = ("gsm8k", "math", "olympiadbench", "omnimath")


def get_config():
  c = base_suite_config("step_critic")
  for split in PROCESSBENCH_SPLITS:
    c.benchmarks[f"processbench_{split}"] = benchmark_entry(
        f"data/processbench/{split}.jsonl", "processbench", template="step_critique",
        step_indexing="deepcritic", max_new_tokens=8192)
  c.batch_size = 32
  return c
