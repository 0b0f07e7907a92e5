"""Held-out evaluation during CFT: held-out loss / token accuracy, and verdict accuracy of greedy
critiques (generated, parsed with `parse_verdict`, compared with the rows' correctness labels)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from cftjax import parallel, sampling
from cftjax.data import pipeline, sources, templates
from cftjax.data.records import CritiqueRecord
from cftjax.data.verdicts import parse_verdict
from cftjax.models import ModelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VerdictCounts:
  """Verdicts of a set of critiques against labels; a missing verdict counts as wrong."""

  correct_on_right: int  # label True, verdict True
  correct_on_wrong: int  # label False, verdict False
  num_right: int  # rows labelled True
  num_wrong: int  # rows labelled False
  missing: int  # critiques with no parseable verdict

  @classmethod
  def from_verdicts(cls, verdicts: list[bool | None], labels: list[bool]) -> "VerdictCounts":
    return cls(correct_on_right=sum(v is True and l for v, l in zip(verdicts, labels)),
               correct_on_wrong=sum(v is False and not l for v, l in zip(verdicts, labels)),
               num_right=sum(labels), num_wrong=len(labels) - sum(labels),
               missing=sum(v is None for v in verdicts))

  def metrics(self) -> dict[str, float]:
    """verdict_accuracy, verdict_balanced_accuracy (mean of the per-label accuracies), missing rate."""
    total = max(self.num_right + self.num_wrong, 1)
    per_label = [c / n for c, n in ((self.correct_on_right, self.num_right),
                                    (self.correct_on_wrong, self.num_wrong)) if n]
    return {"verdict_accuracy": (self.correct_on_right + self.correct_on_wrong) / total,
            "verdict_balanced_accuracy": float(np.mean(per_label)) if per_label else 0.0,
            "verdict_missing_rate": self.missing / total}


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
    self._prompts: list[np.ndarray] = []
    if config.eval.verdict_examples > 0:
      self._records = labelled_records(config.data.eval_path, config.data.format,
                                       config.eval.verdict_examples, config.data.on_bad_row)
      self._prompts = [templates.render_prompt(r, config.data.template, tokenizer) for r in self._records]

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

  def critiques(self, params: Any) -> list[str]:
    """Greedy critiques of the held-out prompts, decoded."""
    texts = []
    batch_size = self._config.eval.batch_size
    for start in range(0, len(self._prompts), batch_size):
      prompts = self._prompts[start:start + batch_size]
      real = len(prompts)
      prompts = prompts + [prompts[-1]] * (batch_size - real)  # one compiled shape for every batch
      result = sampling.generate(
          params, self._model_cfg, prompts, rng=jax.random.PRNGKey(0),
          max_new_tokens=self._config.eval.max_new_tokens, temperature=0.0,
          stop_ids=self._tokenizer.eos_ids, pad_id=self._tokenizer.pad_id or 0)
      for row in range(real):
        ids = result.tokens[row, :result.lengths[row]]
        texts.append(self._tokenizer.decode(ids, skip_special_tokens=True))
    return texts

  def verdict_metrics(self, params: Any) -> tuple[dict[str, float], list[str]]:
    """(verdict_accuracy / balanced accuracy / missing rate, the critiques they were parsed from)."""
    if not self._records:
      return {}, []
    texts = self.critiques(params)
    verdicts = [parse_verdict(t, self._config.eval.verdict_style) for t in texts]
    counts = VerdictCounts.from_verdicts(verdicts, [bool(r.label) for r in self._records])
    return counts.metrics(), texts

  def evaluate(self, params: Any) -> dict[str, float]:
    """All held-out metrics of `params`."""
    metrics = self.heldout_loss(params) if self._config.eval.loss_batches > 0 else {}
    verdicts, texts = self.verdict_metrics(params)
    if texts:
      log.info("sample held-out critique (label %s):\n%s", self._records[0].label, texts[0])
    return metrics | verdicts
