"""Held-out verdict accuracy during training: greedy critiques of labelled held-out rows, generated,
parsed with `parse_verdict` and compared with the labels; plus an eval suite (eval.suite) run on the
current params. The trainers receive it through `make_verdict_evaluator` (cftjax.launch wires it)."""

from __future__ import annotations

import logging
from typing import Any

from cftjax import config as config_lib
from cftjax.data import pipeline, sources
from cftjax.data.critique import CritiqueRecord
from cftjax.eval import runner
from cftjax.models import ModelConfig

log = logging.getLogger(__name__)


def labelled_records(spec: dict[str, Any], limit: int, on_bad_row: str = "error") -> list[CritiqueRecord]:
  """The first `limit` rows of the source `spec` that carry a correctness label (unlabelled rows
  counted)."""
  dataset, info = sources.open_source(spec, on_bad_row=on_bad_row)
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
    raise ValueError(f"data.eval_path={spec['path']!r} has no rows with a correctness label; verdict "
                     "accuracy needs labels (or set eval.verdict_examples=0)")
  return records


class VerdictEvaluator:
  """Verdict accuracy of greedy critiques of the first eval.verdict_examples labelled rows of
  data.eval_path, and the eval.suite's metrics ("<benchmark>/<metric>"); built once per run.

  Args:
    config: the run config (sections data, eval).
    model_cfg: the model config used for generation (compute dtype included).
    tokenizer: a `cftjax.tokenizer.Tokenizer`.
  """

  def __init__(self, config: Any, model_cfg: ModelConfig, tokenizer: Any):
    self._config, self._model_cfg, self._tokenizer = config, model_cfg, tokenizer
    self._records: list[CritiqueRecord] = []
    self._source = pipeline.eval_source(config.data)
    if config.eval.verdict_examples > 0:
      self._records = labelled_records(self._source, config.eval.verdict_examples, config.data.on_bad_row)
    self._suite = None
    if config.eval.suite:
      suite_cfg = config_lib.load_config(config.eval.suite, [])
      suite_cfg.limit, suite_cfg.output_dir, suite_cfg.progress_bar = config.eval.suite_limit, "", False
      self._suite = runner.PeriodicEval(suite_cfg, tokenizer, model_cfg)

  def verdict_metrics(self, params: Any) -> tuple[dict[str, float], list[str]]:
    """(verdict_accuracy / balanced accuracy / missing rate, the greedy critiques they were parsed from).

    A missing verdict counts as wrong. Scored by `cftjax.eval.runner.score_critiques`, the same path
    as `cftjax eval`.
    """
    if not self._records:
      return {}, []
    ev = self._config.eval
    summary, texts = runner.score_critiques(
        params, self._model_cfg, self._tokenizer, self._records, template=self._source["template"],
        verdict_style=ev.verdict_style, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens)
    return {"verdict_accuracy": summary["accuracy"],
            "verdict_balanced_accuracy": summary["balanced_accuracy"],
            "verdict_missing_rate": summary["missing_rate"]}, texts

  def evaluate(self, params: Any) -> dict[str, float]:
    """The suite's metrics and the verdict metrics of `params`."""
    metrics = self._suite(params, step=0) if self._suite is not None else {}
    verdicts, texts = self.verdict_metrics(params)
    if texts:
      log.info("sample held-out critique (label %s):\n%s", self._records[0].label, texts[0])
    return metrics | verdicts

  def close(self) -> None:
    if self._suite is not None:
      self._suite.close()


def make_verdict_evaluator(config: Any, model_cfg: ModelConfig, tokenizer: Any) -> VerdictEvaluator | None:
  """A `cftjax.train.run.EvaluatorFactory`: the VerdictEvaluator, or None when the run asks for no
  verdict accuracy and no suite."""
  if not (config.eval.verdict_examples or config.eval.suite):
    return None
  return VerdictEvaluator(config, model_cfg, tokenizer)
