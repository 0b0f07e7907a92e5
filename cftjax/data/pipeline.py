"""Grain input pipelines: weighted source mixtures -> CFT batches (packed/padded) or RL prompts.

Every builder reads the config's `data` section (`cftjax.config.base_config`: template, max_seq_len,
length_policy, on_bad_row, packing, seed) and takes what differs per stream as keyword arguments:
the source specs, the global batch size, the epochs and the worker processes (and, for RL prompts,
max_prompt_len). Sharded per JAX process, seeded, epoch-aware, and resumable from a JSON iterator
state.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from cftjax.config import ConfigError
from cftjax.data import critique, readers
from cftjax.data import sources as sources_lib

logger = logging.getLogger(__name__)

LENGTH_POLICIES = ("drop", "truncate", "error")
ON_BAD_ROW = ("error", "skip")
CFT_KEYS = ("inputs", "targets", "loss_mask")

# Example status set by the (possibly out-of-process) renderers, counted in the main process.
OK, TRUNCATED, TOO_LONG, NO_TARGET = "ok", "truncated", "too_long", "no_target"
BAD_ROW = "bad_row"
COUNT_KEYS = ("seen", "kept", "truncated", "dropped_too_long", "dropped_no_target",
              "dropped_bad_row")


# ----------------------------------------------------------------------------------------------
# The data section and the stream arguments.

def train_sources(data: Any) -> list[dict[str, Any]]:
  """The training rows' source specs: data.sources, else one spec per ","-separated path of
  data.train_path (read as data.format)."""
  if data.sources:
    return [dict(spec) for spec in data.sources]
  paths = [path.strip() for path in data.train_path.split(",") if path.strip()]
  if not paths:
    raise ConfigError("no training data: set --config.data.train_path (or data.sources)")
  return [{"path": path, "format": data.format} for path in paths]


def check_data(data: Any) -> None:
  """Raises a ConfigError naming the key when the data section's rendering keys are unusable."""
  if int(data.max_seq_len) < 1:
    raise ConfigError(f"data.max_seq_len={data.max_seq_len!r} must be a positive number of tokens")
  if data.length_policy not in LENGTH_POLICIES:
    raise ConfigError(f"data.length_policy={data.length_policy!r} is not one of {LENGTH_POLICIES}; "
                      "set --config.data.length_policy=drop")
  if data.on_bad_row not in ON_BAD_ROW:
    raise ConfigError(f"data.on_bad_row={data.on_bad_row!r} is not one of {ON_BAD_ROW}; set "
                      "--config.data.on_bad_row=error")


def source_specs(sources: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The source specs validated, with their defaults filled in (`sources.normalize_source_spec`)."""
  if isinstance(sources, (str, Mapping)) or not len(sources):
    raise ConfigError("data.sources must be a non-empty tuple of source specs (dicts with a 'path'), "
                      "or set data.train_path")
  return [sources_lib.normalize_source_spec(spec, f"data.sources[{i}]") for i, spec in enumerate(sources)]


def host_batch_size(batch_size: int, process_count: int) -> int:
  """This process's rows of a global batch of `batch_size` rows."""
  if int(batch_size) < 1:
    raise ConfigError(f"batch size {batch_size!r} must be a positive number of rows; set "
                      "data.batch_size (eval.batch_size for the held-out loss)")
  if batch_size % process_count:
    raise ConfigError(f"batch size {batch_size} (global; data.batch_size or eval.batch_size) is not "
                      f"divisible by the process count {process_count}; make it a multiple of it")
  return batch_size // process_count


def source_templates(data: Any, specs: Sequence[Mapping[str, Any]]) -> list[Any]:
  """The template object of each source spec: its own 'template', else data.template."""
  resolved = []
  for i, spec in enumerate(specs):
    name_or_spec = spec["template"] if spec["template"] is not None else data.template
    if not name_or_spec:
      raise ConfigError(f"no template for data.sources[{i}] ({spec['name']!r}); set "
                        "data.template or the source spec's 'template'")
    resolved.append(critique.get_template(name_or_spec))
  return resolved


def eval_source(data: Any) -> dict[str, Any]:
  """The source spec of the held-out rows (data.eval_path, data.eval_split), rendered with
  data.eval_template or else the training sources' template, so train and eval prompts match
  (data.template when no training rows are configured). Held-out rows are labelled solutions, so
  when sources differ (e.g. CRL rows mixed with math prompts) the one template of the sources that
  show a solution (`{solution}` in the user turn) is used; several different ones are an error."""
  template = data.get("eval_template")
  if template is None and not (data.sources or data.train_path):
    template = data.template
  if template is None:
    specs = source_specs(train_sources(data))
    templates = source_templates(data, specs)
    critique_templates = [t for t in templates if "{solution}" in t.user]
    candidates = critique_templates or templates
    if any(t != candidates[0] for t in candidates[1:]):
      names = ", ".join(f"{spec['name']}: {t.name}" for spec, t in zip(specs, templates))
      raise ConfigError(f"the training sources use different templates ({names}); set "
                        "data.eval_template to the one for the held-out rows of data.eval_path")
    template = candidates[0]
  return {"path": data.eval_path, "format": data.format, "split": data.get("eval_split", ""),
          "template": template, "name": "eval"}


# ----------------------------------------------------------------------------------------------
# Records: sharded, shuffled per epoch, mixed by weight.

class EpochMixture(grain.transforms.DatasetSelectionMap):
  """Interleaves components by weight in epochs: epoch e holds quotas[c] rows of component c.

  Component c's rows for epoch e are its stream positions e*quotas[c] .. (e+1)*quotas[c]-1, spread
  evenly through the epoch. Stateless and random-access, so Grain can checkpoint and shard it.
  """

  def __init__(self, quotas: Sequence[int], num_epochs: int | None):
    self._quotas = np.asarray(quotas, np.int64)
    component = np.repeat(np.arange(len(quotas)), quotas)
    rank = np.concatenate([np.arange(q) for q in quotas])
    order = np.argsort((rank + 0.5) / self._quotas[component], kind="stable")
    self._component, self._rank = component[order], rank[order]
    self._epoch_len = int(self._quotas.sum())
    self._length = sys.maxsize if num_epochs is None else self._epoch_len * int(num_epochs)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> tuple[int, int]:
    epoch, position = divmod(int(index), self._epoch_len)
    component = int(self._component[position])
    return component, epoch * int(self._quotas[component]) + int(self._rank[position])


def epoch_quotas(num_rows: Sequence[int], weights: Sequence[float]) -> list[int]:
  """Rows per component per epoch: the component with the fewest rows per unit weight is read
  exactly once per epoch; the others are sampled in proportion to their weight (at least once)."""
  total = float(sum(weights))
  shares = [w / total for w in weights]
  rows_per_share = max(n / s for n, s in zip(num_rows, shares))
  return [max(n, round(s * rows_per_share)) for n, s in zip(num_rows, shares)]


def open_config_source(data: Any, spec: dict[str, Any]):
  """open_source of a normalised spec under data.on_bad_row: with "skip", lazily read bad rows
  become BadRow items to count."""
  on_bad_row = "mark" if data.on_bad_row == "skip" else "error"
  return sources_lib.open_source(spec, on_bad_row=on_bad_row)


class _TagComponent:
  """Pairs each record with its component index so renderers can pick the template / task."""

  def __init__(self, component: int):
    self.component = component

  def __call__(self, record):
    return (self.component, record)


def open_mixture(data: Any, specs: Sequence[dict[str, Any]], num_epochs: int | None,
                 process_index: int, process_count: int
                 ) -> tuple[grain.MapDataset, list[sources_lib.SourceInfo]]:
  """MapDataset of (component, CritiqueRecord) for this host: shard -> shuffle (data.seed) -> mix
  the normalised `specs` by weight -> `num_epochs` epochs (None: endless)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  components, infos, shard_rows = [], [], []
  for c, spec in enumerate(specs):
    dataset, info = open_config_source(data, spec)
    shard = dataset[process_index::process_count]
    if len(shard) == 0:
      raise ValueError(f"source {info.name!r} has {info.num_rows} rows, too few to give each of "
                       f"{process_count} processes at least one")
    seed = (int(data.seed) * 1_000_003 + c) % 2**32
    components.append(shard.shuffle(seed=seed).repeat(None).map(_TagComponent(c)))
    infos.append(info)
    shard_rows.append(len(shard))
  quotas = epoch_quotas(shard_rows, [info.weight for info in infos])
  logger.info("data mixture (process %d/%d): %s rows per epoch", process_index, process_count,
              ", ".join(f"{i.name}={q}" for i, q in zip(infos, quotas)))
  mixture = grain.MapDataset.select_from_datasets(components, EpochMixture(quotas, num_epochs))
  return mixture, infos


# ----------------------------------------------------------------------------------------------
# Rendering (runs in worker processes when num_workers > 0; must be picklable).

def _render_error(error: critique.MissingFieldError, record, on_bad_row: str) -> dict[str, Any]:
  """A record the template cannot render (e.g. no critique for a CFT target): a counted bad row
  under on_bad_row="skip", else a DataError naming the row."""
  message = f"{record.source or 'source'} row {record.id or '?'}: cannot render: {error}"
  if on_bad_row != "skip":
    raise readers.DataError(f"{message} (set data.on_bad_row=skip to skip such rows)", "render_error")
  return _bad_row_item(sources_lib.BadRow(record.id, "render_error", message))


class CFTExampleMaker:
  """(component, record) -> shifted CFT example with its length-policy status."""

  def __init__(self, templates: Sequence[Any], tokenizer: Any, max_seq_len: int,
               length_policy: str, on_bad_row: str = "error"):
    self.templates = list(templates)
    self.tokenizer = tokenizer
    self.max_seq_len = int(max_seq_len)
    self.length_policy = length_policy
    self.on_bad_row = on_bad_row

  def render(self, component: int, record) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [n] and their trained-token mask [n] (float32)."""
    ids, mask = critique.render_cft(record, self.templates[component], self.tokenizer)
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)

  def __call__(self, tagged) -> dict[str, Any]:
    component, record = tagged
    if isinstance(record, sources_lib.BadRow):
      return _bad_row_item(record)
    try:
      ids, mask = self.render(component, record)
    except critique.MissingFieldError as e:
      return _render_error(e, record, self.on_bad_row)
    length = len(ids) - 1  # predicted positions: inputs = ids[:-1], targets = ids[1:]
    status = OK
    if length > self.max_seq_len:
      if self.length_policy != "truncate":
        return _item(None, TOO_LONG, length, record)
      ids, mask = ids[:self.max_seq_len + 1], mask[:self.max_seq_len + 1]
      status = TRUNCATED
    example = {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}
    if not example["loss_mask"].any():
      status = NO_TARGET
    return _item(example, status, length, record)


class RLPromptMaker:
  """(component, record) -> RL prompt dict {"prompt_ids", "record", "source", "task"} + status."""

  def __init__(self, templates: Sequence[Any], infos: Sequence[sources_lib.SourceInfo],
               tokenizer: Any, max_prompt_len: int, on_bad_row: str = "error"):
    self.on_bad_row = on_bad_row
    self.templates = list(templates)
    self.names = [info.name for info in infos]
    self.tasks = [info.task for info in infos]
    self.tokenizer = tokenizer
    self.max_prompt_len = int(max_prompt_len)

  def __call__(self, tagged) -> dict[str, Any]:
    component, record = tagged
    if isinstance(record, sources_lib.BadRow):
      return _bad_row_item(record)
    try:
      ids = np.asarray(critique.render_prompt(record, self.templates[component], self.tokenizer), np.int32)
    except critique.MissingFieldError as e:
      return _render_error(e, record, self.on_bad_row)
    task = self.tasks[component]
    prompt = {"prompt_ids": ids, "record": record, "source": self.names[component],
              "task": (record.task or "cft") if task == "auto" else task}
    status = TOO_LONG if len(ids) > self.max_prompt_len else OK
    return _item(prompt if status == OK else None, status, len(ids), record)


def _item(example, status: str, length: int, record) -> dict[str, Any]:
  return {"example": example, "status": status, "length": length,
          "where": f"{record.source or 'source'} row {record.id or '?'}"}


def _bad_row_item(bad_row: sources_lib.BadRow) -> dict[str, Any]:
  return {"example": None, "status": BAD_ROW, "length": 0, "where": bad_row.message}


# ----------------------------------------------------------------------------------------------
# Length policy: counted (and checkpointed) in the main process.

class LengthPolicyIterDataset(grain.IterDataset):
  """Applies the length policy to rendered items: counts, drops or raises, yields examples.

  `counts` is filled by the latest iterator; its values are part of the iterator state.
  """

  def __init__(self, parent: grain.IterDataset, limit: int, limit_key: str, policy: str,
               counts: dict[str, int]):
    super().__init__(parent)
    self._limit, self._limit_key, self._policy, self._counts = limit, limit_key, policy, counts

  def __iter__(self) -> grain.DatasetIterator:
    return _LengthPolicyIterator(self._parent.__iter__(), self._limit, self._limit_key,
                                 self._policy, self._counts)


class _LengthPolicyIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, limit: int, limit_key: str, policy: str,
               counts: dict[str, int]):
    super().__init__(parent)
    self._limit, self._limit_key, self._policy = limit, limit_key, policy
    self._counts = counts
    self._counts.clear()
    self._counts.update(dict.fromkeys(COUNT_KEYS, 0))

  def __next__(self):
    while True:
      try:
        item = next(self._parent)
      except StopIteration:
        logger.info("data stream ended; length policy counts: %s", self._counts)
        raise
      self._counts["seen"] += 1
      status = item["status"]
      if status == TOO_LONG and self._policy == "error":
        raise ValueError(
            f"{item['where']}: {item['length']} tokens > {self._limit_key}={self._limit}; "
            f"raise {self._limit_key} or set data.length_policy to 'drop' or 'truncate'")
      if status in (TOO_LONG, NO_TARGET, BAD_ROW):
        self._count_event("dropped_" + status, item)
        continue
      if status == TRUNCATED:
        self._count_event("truncated", item)
      self._counts["kept"] += 1
      return item["example"]

  def _count_event(self, key: str, item: dict[str, Any]) -> None:
    self._counts[key] += 1
    n = self._counts[key]
    if n <= 3 or (n & (n - 1)) == 0:
      detail = "" if key == "dropped_bad_row" else (
          f" ({item['length']} tokens, {self._limit_key}={self._limit})")
      logger.warning("%s: %s%s; counts so far: %s", item["where"], key, detail, self._counts)

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "counts": dict(self._counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._counts.update(state["counts"])


class DataIterator(grain.DatasetIterator):
  """Host-local batch iterator with a JSON-serialisable state (also an Orbax checkpointable).

  `length_counts` holds this iterator's length-policy counts (seen, kept, truncated, dropped_*).
  """

  def __init__(self, parent: grain.DatasetIterator, length_counts: dict[str, int]):
    super().__init__(parent)
    self._length_counts = length_counts

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  @property
  def length_counts(self) -> dict[str, int]:
    return dict(self._length_counts)

  def __enter__(self) -> DataIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _rendered_stream(mixture: grain.MapDataset, maker: Any, num_workers: int) -> grain.IterDataset:
  """Renders records (in `num_workers` processes when > 0) into status-tagged items."""
  dataset = mixture.map(maker).to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                                 prefetch_buffer_size=256))
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return dataset


def _ensure_absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; outside an absl app they are not parsed yet."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ----------------------------------------------------------------------------------------------
# CFT batches.

class _PadBatchRows:
  """Appends all-padding rows (segment 0, loss 0) so every batch has `batch_rows` rows."""

  def __init__(self, batch_rows: int):
    self.batch_rows = batch_rows

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = self.batch_rows - len(batch["inputs"])
    if missing <= 0:
      return batch
    return {key: np.pad(value, ((0, missing), (0, 0))) for key, value in batch.items()}


def _packed_to_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Grain's packed rows (inputs_positions, inputs_segment_ids, ...) -> the CFT batch keys."""
  batch = {key: packed[key] for key in CFT_KEYS}
  batch["positions"] = packed["inputs_positions"]
  batch["segment_ids"] = packed["inputs_segment_ids"]
  return batch


class _PadExample:
  """One shifted example -> one row of the CFT batch format, right-padded to `seq_len`."""

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def __call__(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(example["inputs"])
    row = {key: np.pad(example[key], (0, self.seq_len - n)) for key in CFT_KEYS}
    row["positions"] = np.pad(np.arange(n, dtype=np.int32), (0, self.seq_len - n))
    row["segment_ids"] = np.pad(np.ones(n, np.int32), (0, self.seq_len - n))
    return row


def _open_stream(data: Any, sources: Sequence[Mapping[str, Any]], batch_size: int,
                 num_epochs: int | None, num_workers: int, process_index: int, process_count: int
                 ) -> tuple[grain.MapDataset, list[sources_lib.SourceInfo], list[Any], int]:
  """Checks the data section and the stream arguments; returns this host's mixture (`open_mixture`),
  the sources' infos and templates, and the host's rows per batch."""
  check_data(data)
  specs = source_specs(sources)
  batch_rows = host_batch_size(batch_size, process_count)
  if num_epochs is not None and int(num_epochs) < 1:
    raise ConfigError(f"data.num_epochs={num_epochs!r} must be >= 1 (or set train.steps)")
  if int(num_workers) < 0:
    raise ConfigError(f"data.num_workers={num_workers!r} must be >= 0 (0 renders in-process)")
  mixture, infos = open_mixture(data, specs, num_epochs, process_index, process_count)
  return mixture, infos, source_templates(data, specs), batch_rows


def make_cft_iterator(data: Any, tokenizer: Any, *, sources: Sequence[Mapping[str, Any]],
                      batch_size: int, num_epochs: int | None, num_workers: int = 0,
                      process_index: int = 0, process_count: int = 1) -> DataIterator:
  """Host-local CFT batches of `sources`' rows rendered as `data` says; get_state()/set_state()
  resume exactly.

  Each batch: {inputs, targets, loss_mask, positions, segment_ids}, each [batch_size //
  process_count, data.max_seq_len], several examples per row when data.packing. num_epochs: passes
  over the mixture (None: endless). num_workers: rendering processes (0: in-process).
  """
  mixture, _, templates, batch_rows = _open_stream(data, sources, batch_size, num_epochs, num_workers,
                                                   process_index, process_count)
  seq_len = int(data.max_seq_len)
  maker = CFTExampleMaker(templates, tokenizer, seq_len, data.length_policy, data.on_bad_row)
  counts: dict[str, int] = {}
  examples = LengthPolicyIterDataset(_rendered_stream(mixture, maker, int(num_workers)), seq_len,
                                     "data.max_seq_len", data.length_policy, counts)
  if data.packing:
    packed = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct=dict.fromkeys(CFT_KEYS, seq_len), num_packing_bins=batch_rows,
        shuffle_bins=False)
    batches = packed.batch(batch_rows).map(_packed_to_batch)
  else:
    batches = examples.map(_PadExample(seq_len)).batch(batch_rows)
  return DataIterator(iter(batches.map(_PadBatchRows(batch_rows))), counts)


# ----------------------------------------------------------------------------------------------
# RL prompt batches.

def make_rl_iterator(data: Any, tokenizer: Any, *, sources: Sequence[Mapping[str, Any]],
                     batch_size: int, num_epochs: int | None, max_prompt_len: int,
                     num_workers: int = 0, process_index: int = 0, process_count: int = 1
                     ) -> DataIterator:
  """Host-local RL prompt batches of `sources`' rows; get_state()/set_state() resume exactly.

  Each batch: a list of batch_size // process_count dicts {"prompt_ids": int32 [P], "record",
  "source", "task"} (the last one of a finite stream may be shorter). Prompts longer than
  max_prompt_len (rl.max_prompt_len) are dropped and counted, whatever data.length_policy says.
  Other arguments as for `make_cft_iterator`.
  """
  if int(max_prompt_len) < 1:
    raise ConfigError(f"rl.max_prompt_len={max_prompt_len!r} must be a positive number of tokens")
  mixture, infos, templates, batch_rows = _open_stream(data, sources, batch_size, num_epochs,
                                                       num_workers, process_index, process_count)
  maker = RLPromptMaker(templates, infos, tokenizer, max_prompt_len, data.on_bad_row)
  counts: dict[str, int] = {}
  prompts = LengthPolicyIterDataset(_rendered_stream(mixture, maker, int(num_workers)),
                                    int(max_prompt_len), "rl.max_prompt_len", "drop", counts)
  return DataIterator(iter(prompts.batch(batch_rows, batch_fn=list)), counts)
