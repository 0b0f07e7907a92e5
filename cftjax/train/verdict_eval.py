"""Held-out evaluation during CFT: held-out loss / token accuracy, and verdict accuracy of greedy
critiques (generated, parsed with `parse_verdict`, compared with the rows' correctness labels)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import jax

from cftjax import parallel
from cftjax.data import pipeline, sources
from cftjax.data.records import CritiqueRecord
from cftjax.eval import runner
from cftjax.models import ModelConfig

log = logging.getLogger(__name__)


def labelled_records(eval_path: str, data_format: str, limit: int, on_bad_row: str = "error"
                     ) -> list[CritiqueRecord]:
  """The first `limit` rows of `eval_path` that carry a correctness label (unlabelled rows counted)."""
  dataset, info = sources.open_source({"path": eval_path, "format": data_format}, on_bad_row=on_bad_row)
  records, unlabelled = [], 0
  for index in range(len(dataset)):
    if len(records) == limit:
      break
    record = dataset[index]
    if record is None:
      continue
    if record.label is None:
      unlabelled += 1
      continue
    records.append(record)
  if unlabelled:
    log.warning("%s: skipped %d rows without a label for verdict accuracy", info.path, unlabelled)
  if not records:
    raise ValueError(f"data.eval_path={eval_path!r} has no rows with a correctness label; verdict "
                     "accuracy needs labels (or set eval.verdict_examples=0)")
  return records


class HeldOutEvaluator:
  """Computes the held-out metrics of a set of params; built once, called at every eval step.

  Args:
    config: the run config (sections data, eval).
    model_cfg: the model config used for generation (compute dtype included).
    tokenizer: a `cftjax.tokenizer.Tokenizer`.
    mesh, rules: where the eval batches go (`parallel.host_local_to_global`).
    eval_step: `sft_step.make_eval_step(...)`, `(params, batch) -> {loss_sum, token_count, correct_sum}`.
  """

  def __init__(self, config: Any, model_cfg: ModelConfig, tokenizer: Any, mesh: Any,
               rules: parallel.LogicalRules, eval_step: Callable[[Any, dict[str, Any]], dict[str, Any]]):
    self._config, self._model_cfg, self._tokenizer = config, model_cfg, tokenizer
    self._mesh, self._rules, self._eval_step = mesh, rules, eval_step
    self._records: list[CritiqueRecord] = []
    if config.eval.verdict_examples > 0:
      self._records = labelled_records(config.data.eval_path, config.data.format,
                                       config.eval.verdict_examples, config.data.on_bad_row)
    self._suite = None
    if config.eval.get("suite"):
      from cftjax import config as config_lib  # pylint: disable=import-outside-toplevel

      suite_cfg = config_lib.load_config(config.eval.suite, [])
      suite_cfg.limit, suite_cfg.output_dir, suite_cfg.progress_bar = config.eval.suite_limit, "", False
      self._suite = runner.make_periodic_eval(suite_cfg, tokenizer, model_cfg)

  def _loss_data_config(self) -> dict[str, Any]:
    data, ev = self._config.data, self._config.eval
    return {"sources": [{"path": data.eval_path, "format": data.format}], "template": data.template,
            "max_seq_len": data.max_seq_len, "batch_size": ev.batch_size, "packing": data.packing,
            "length_policy": data.length_policy, "on_bad_row": data.on_bad_row, "seed": data.seed,
            "num_epochs": 1}

  def heldout_loss(self, params: Any) -> dict[str, float]:
    """eval_loss and eval_accuracy (next-token) over the first eval.loss_batches held-out batches."""
    iterator = pipeline.make_sft_iterator(self._loss_data_config(), self._tokenizer,
                                          jax.process_index(), jax.process_count())
    totals = None
    for batch in itertools.islice(iterator, self._config.eval.loss_batches):
      sums = self._eval_step(params, parallel.host_local_to_global(batch, self._mesh, self._rules))
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    iterator.close()
    if totals is None:
      return {}
    totals = jax.device_get(totals)
    count = max(float(totals["token_count"]), 1.0)
    return {"eval_loss": float(totals["loss_sum"]) / count,
            "eval_accuracy": float(totals["correct_sum"]) / count}

  def verdict_metrics(self, params: Any) -> tuple[dict[str, float], list[str]]:
    """(verdict_accuracy / balanced accuracy / missing rate, the greedy critiques they were parsed from).

    A missing verdict counts as wrong. Scored by `cftjax.eval.runner.score_critiques`, the same path
    as `cftjax eval`.
    """
    if not self._records:
      return {}, []
    ev = self._config.eval
    summary, texts = runner.score_critiques(
        params, self._model_cfg, self._tokenizer, self._records, template=self._config.data.template,
        verdict_style=ev.verdict_style, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens)
    return {"verdict_accuracy": summary["accuracy"],
            "verdict_balanced_accuracy": summary["balanced_accuracy"],
            "verdict_missing_rate": summary["missing_rate"]}, texts

  def evaluate(self, params: Any) -> dict[str, float]:
    """All held-out metrics of `params`."""
    metrics = self.heldout_loss(params) if self._config.eval.loss_batches > 0 else {}
    if self._suite is not None:
      metrics |= self._suite(params, step=0)
    verdicts, texts = self.verdict_metrics(params)
    if texts:
      log.info("sample held-out critique (label %s):\n%s", self._records[0].label, texts[0])
    return metrics | verdicts
