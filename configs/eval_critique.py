"""Critique quality: verdict accuracy on a labelled critique set (balanced accuracy, F1 on right and
on wrong, missing verdicts, per verdict style) and ProcessBench earliest-error-step F1.

  cftjax eval --config configs/eval_critique.py --ckpt DIR \
      --config.benchmarks.verdicts.path=data/critique_eval/heldout.jsonl \
      --config.benchmarks.processbench_gsm8k.path=data/processbench/gsm8k.jsonl

The verdict set may be in any reader format with labels (cftjax JSONL, WebInstruct-CFT, one-shot CFT,
verl CRL rows); set --config.benchmarks.verdicts.template=crl and .verdict_style=crl for a CRL critic.
Run a subset with --config.benchmarks_to_run=verdicts.
"""

from cftjax.eval.suites import base_suite_config, benchmark_entry

PROCESSBENCH_SPLITS = ("gsm8k", "math", "olympiadbench", "omnimath")


def get_config():
  c = base_suite_config("critique")
  c.benchmarks.verdicts = benchmark_entry("data/critique_eval/heldout.jsonl", "critique", template="cft",
                                          verdict_style="cft", max_new_tokens=2048)
  for split in PROCESSBENCH_SPLITS:
    c.benchmarks[f"processbench_{split}"] = benchmark_entry(f"data/processbench/{split}.jsonl",
                                                            "processbench", max_new_tokens=4096)
  c.benchmarks_to_run = ",".join(["verdicts"] + [f"processbench_{s}" for s in PROCESSBENCH_SPLITS])
  c.batch_size = 32
  return c
