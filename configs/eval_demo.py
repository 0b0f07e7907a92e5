"""Demo: held-out verdict accuracy of the tiny critic of configs/demo_cft.py on the synthetic world's
held-out critique set (500 additions, half right, half subtly wrong), on a laptop CPU.

  cftjax eval --config configs/eval_demo.py --ckpt MODEL_DIR

MODEL_DIR is a cftjax model checkpoint (model_config.json + params/ + tokenizer/). The world lives in
runs/demo_cft/world after `cftjax train --config configs/demo_cft.py`; point elsewhere with
--config.benchmarks.heldout.path=... An untrained model scores ~50%, the trained demo >= 90%.
"""

from cftjax.eval.suites import base_suite_config, benchmark_entry


def get_config():
  c = base_suite_config("demo")
  c.benchmarks.heldout = benchmark_entry("runs/demo_cft/world/heldout.jsonl", "critique", template="cft",
                                         verdict_style="cft", max_new_tokens=96, limit=200)
  c.batch_size = 50
  c.tokenizer_dir = "runs/demo_cft/world/tokenizer"  # used only when the checkpoint has no tokenizer/
  return c
