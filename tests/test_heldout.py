"""In-training evaluation: held-out verdict accuracy plus an eval suite (`eval.suite`) on the same params."""

from __future__ import annotations

import jax

from cftjax.config import base_config
from cftjax.data import readers, synthetic
from cftjax.eval import runner
from cftjax.models import ModelConfig, init_params
from cftjax.tokenizer import Tokenizer
from cftjax.eval.heldout import VerdictEvaluator

SUITE = '''
from cftjax.eval.suites import base_suite_config, benchmark_entry
def get_config():
  c = base_suite_config("in_training")
  c.benchmarks.heldout = benchmark_entry({path!r}, "critique", template="cft", verdict_style="cft",
                                         max_new_tokens=8)
  c.batch_size = 4
  return c
'''


def test_suite_metrics_join_the_heldout_metrics(tmp_path):
  paths = synthetic.write_world(str(tmp_path / "world"), num_train=10, num_heldout=6)
  suite_file = tmp_path / "suite.py"
  suite_file.write_text(SUITE.format(path=paths["heldout"]))
  config = base_config()
  config.data.eval_path = paths["heldout"]
  config.eval.loss_batches = 0
  config.eval.verdict_examples = 6
  config.eval.batch_size = 4
  config.eval.max_new_tokens = 8
  config.eval.suite = str(suite_file)
  config.eval.suite_limit = 3
  tokenizer = Tokenizer.from_dir(paths["tokenizer"])
  cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=16)
  params = init_params(cfg, jax.random.key(0))
  evaluator = VerdictEvaluator(config, cfg, tokenizer)
  metrics = evaluator.evaluate(params)
  assert metrics["heldout/num_examples"] == 3  # suite_limit applied
  # The same greedy critiques on the first 3 rows score the same through both paths.
  records = readers.load_records(paths["heldout"])[:3]
  direct, _ = runner.score_critiques(params, cfg, tokenizer, records, template="cft", verdict_style="cft",
                                     batch_size=4, max_new_tokens=8)
  assert metrics["heldout/accuracy"] == direct["accuracy"]
  assert 0.0 <= metrics["verdict_accuracy"] <= 1.0 and "verdict_missing_rate" in metrics
