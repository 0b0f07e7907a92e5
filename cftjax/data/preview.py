"""Human-readable view of a config's training data: rendered examples with the loss mask, length
histograms.

Trained tokens (loss mask 1) are shown wrapped in [[...]].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cftjax.data import critique, pipeline
from cftjax.data import sources as sources_lib

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


def inspect_dataset(data: Any, tokenizer: Any, num_examples: int = 3, max_rows: int = 2000,
                    num_bins: int = 10) -> str:
  """A report on the training rows of the config's `data` section (`pipeline.train_sources`): the
  first `num_examples` examples in pipeline order, then per source a histogram of token lengths over
  up to `max_rows` rows, with what data.length_policy would do."""
  pipeline.check_data(data)
  specs = pipeline.source_specs(pipeline.train_sources(data))
  maker = pipeline.CFTExampleMaker(pipeline.source_templates(data, specs), tokenizer,
                                   data.max_seq_len, data.length_policy, data.on_bad_row)
  mixture, _ = pipeline.open_mixture(data, specs, num_epochs=1, process_index=0, process_count=1)
  lines = [f"== tokenizer {tokenizer.describe()}" if hasattr(tokenizer, "describe") else "== tokenizer"]
  lines += [f"== source {spec['name']!r}: {template_note(template)}" for spec, template in zip(specs, maker.templates)]
  lines += [f"== {num_examples} examples (max_seq_len={data.max_seq_len}, "
           f"length_policy={data.length_policy}; "
           f"trained tokens in {TRAINED_OPEN}...{TRAINED_CLOSE})"]
  shown = 0
  for index in range(len(mixture)):
    if shown == num_examples:
      break
    tagged = mixture[index]
    if isinstance(tagged[1], sources_lib.BadRow):
      continue
    lines += _describe_example(maker, tagged, tokenizer)
    shown += 1
  for component, spec in enumerate(specs):
    dataset, info = pipeline.open_config_source(data, spec)
    lines += _length_report(maker, component, dataset, info, max_rows, num_bins)
  return "\n".join(lines)


def template_note(template) -> str:
  """What a template does with a row's own system turn and instruction."""
  system = ("rows' own system turns are kept (the template has none)" if template.system is None
            else "the template's system turn replaces the rows' own")
  placeholders = {field for key in ("system", "user", "assistant") if getattr(template, key)
                  for field in critique.template_fields(getattr(template, key))}
  instruction = ("rows' own instructions are used ({instruction}" +
                 (", else the template's standard one)" if template.default_instruction else ")")
                 if "instruction" in placeholders else "rows' own instructions are not used")
  return f"template {template.name!r}: {system}; {instruction}"


def _describe_example(maker: pipeline.CFTExampleMaker, tagged, tokenizer) -> list[str]:
  component, record = tagged
  ids, mask = maker.render(component, record)
  status = maker(tagged)["status"]
  header = (f"-- source {record.source!r} id {record.id!r}: {len(ids)} tokens, "
            f"{int(mask.sum())} trained, status {status}")
  return [header, mark_trained(ids, mask, tokenizer), ""]


def mark_trained(ids: np.ndarray, mask: np.ndarray, tokenizer) -> str:
  """Decoded text of ids [n] with each run of trained tokens (mask [n] == 1) wrapped in [[...]]."""
  pieces = []
  start = 0
  for end in range(1, len(ids) + 1):
    if end == len(ids) or mask[end] != mask[start]:
      text = tokenizer.decode([int(t) for t in ids[start:end]])
      pieces.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if mask[start] else text)
      start = end
  return "".join(pieces)


def _length_report(maker: pipeline.CFTExampleMaker, component: int, dataset, info, max_rows: int,
                   num_bins: int) -> list[str]:
  """Token-length histogram and length-policy counts for up to `max_rows` evenly spaced rows."""
  indices = np.unique(np.linspace(0, len(dataset) - 1, min(max_rows, len(dataset))).astype(int))
  counts = dict.fromkeys((pipeline.OK, pipeline.TRUNCATED, pipeline.TOO_LONG,
                          pipeline.NO_TARGET, pipeline.BAD_ROW), 0)
  lengths = []
  for index in indices:
    item = maker((component, dataset[int(index)]))
    counts[item["status"]] += 1
    if item["status"] != pipeline.BAD_ROW:
      lengths.append(item["length"])
  lines = [f"== source {info.name!r} ({info.kind}, {info.path}): {info.num_rows} rows, "
           f"{len(indices)} inspected"]
  if lengths:
    lines.append(f"tokens per example (predicted positions): min {min(lengths)}, "
                 f"mean {np.mean(lengths):.1f}, max {max(lengths)}")
    lines += text_histogram(np.asarray(lengths), num_bins, marker=maker.max_seq_len)
  too_long_action = {"drop": "dropped", "error": "errors", "truncate": "truncated"}
  lines.append(f"ok {counts[pipeline.OK]}, over max_seq_len={maker.max_seq_len}: "
               f"{counts[pipeline.TOO_LONG] + counts[pipeline.TRUNCATED]} "
               f"({too_long_action[maker.length_policy]}), no trained token "
               f"{counts[pipeline.NO_TARGET]} (dropped), bad rows {counts[pipeline.BAD_ROW]} "
               "(skipped)")
  return lines + [""]


def text_histogram(values: np.ndarray, num_bins: int, marker: int | None = None,
                   width: int = 40) -> list[str]:
  """Rows "[lo, hi) count ####"; the bin holding `marker` is flagged with '<'."""
  low = min(int(values.min()), marker if marker is not None else int(values.min()))
  high = max(int(values.max()), marker if marker is not None else 0) + 1
  edges = np.unique(np.linspace(low, high, num_bins + 1).round().astype(int))
  counts, _ = np.histogram(values, bins=edges)
  scale = width / max(1, counts.max())
  rows = []
  for lo, hi, count in zip(edges[:-1], edges[1:], counts):
    flag = f"  < max_seq_len={marker}" if marker is not None and lo <= marker < hi else ""
    rows.append(f"[{lo:>6}, {hi:>6}) {count:>7} {'#' * int(round(count * scale))}{flag}")
  return rows
