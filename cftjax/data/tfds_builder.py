"""Builds versioned TFDS datasets in ArrayRecord format from critique files, without TensorFlow.

Each example stores the original row as JSON text plus a few typed features; pipelines parse it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from cftjax.data import readers
from cftjax.data import sources

logger = logging.getLogger(__name__)

_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
_VERSION_PATTERN = re.compile(r"^\d+\.\d+\.\d+$")
_SKIP_HINT = "(skip bad rows with --on-bad-row skip, on_bad_row='skip' in Python)"


def features() -> tfds.features.FeaturesDict:
  """Stored features: the original row (row_json) and typed fields parsed from it."""
  return tfds.features.FeaturesDict({
      "row_json": tfds.features.Text(doc="the original row, JSON"),
      "id": tfds.features.Text(doc="record id (the row's own, else file:line)"),
      "question": tfds.features.Text(),
      "label": tfds.features.Scalar(np.int32, doc="1 correct, 0 wrong, -1 unknown"),
      "has_critique": tfds.features.Scalar(np.bool_),
  })


def build_dataset(input_path: str | None, out_dir: str, name: str = "critique_rows",
                  version: str = "1.0.0", fmt: str = "auto",
                  splits: Mapping[str, str | float] | None = None, on_bad_row: str = "error",
                  seed: int = 0, overwrite: bool = False) -> str:
  """Writes TFDS dataset `name`/`version` under `out_dir`; returns its directory.

  splits: None -> {"train": input_path}; {split: path} reads each split from its own file;
    {split: fraction} (fractions summing to <= 1) splits `input_path`'s rows by a seeded shuffle.
  Rows that do not parse (malformed JSON included) raise (on_bad_row="error") or are skipped, each
  logged with its file and line, and counted ("skip"). The dataset is built in a temporary directory
  beside it and moved into place when complete, so a failed build leaves an existing version as it
  was. Read it back with the pipeline source spec {"kind": "tfds", "path": <returned dir>}.
  """
  if not _NAME_PATTERN.match(name):
    raise ValueError(f"name={name!r}: TFDS dataset names are snake_case ([a-z][a-z0-9_]*)")
  if not _VERSION_PATTERN.match(version):
    raise ValueError(f"version={version!r}: use MAJOR.MINOR.PATCH, e.g. '1.0.0'")
  if on_bad_row not in ("error", "skip"):
    raise ValueError(f"on_bad_row={on_bad_row!r} must be 'error' or 'skip'")
  dataset_dir = os.path.join(out_dir, name, version)
  if os.path.exists(dataset_dir) and not overwrite:
    raise FileExistsError(f"{dataset_dir} already exists; choose another version (--version) or "
                          "replace it (--overwrite)")
  split_rows = _split_rows(input_path, splits, seed, on_bad_row)
  builder_cls = _builder_class(name, version, split_rows, fmt, on_bad_row)
  os.makedirs(os.path.join(out_dir, name), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.join(out_dir, name), prefix=".building-") as tmp:
    builder = builder_cls(data_dir=tmp, file_format="array_record")
    builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"))
    if os.path.exists(dataset_dir):
      shutil.rmtree(dataset_dir)
    os.replace(os.path.join(tmp, name, version), dataset_dir)
  logger.info("built TFDS dataset %s: %s", dataset_dir,
              {s: info.num_examples for s, info in builder.info.splits.items()})
  return dataset_dir


def _readable_rows(path: str, on_bad_row: str) -> list[tuple[str, dict[str, Any]]]:
  """(where, row) for every row of `path` that reads as a JSON object; the others (malformed JSON,
  not UTF-8, not an object) raise, or with on_bad_row="skip" are logged one by one and counted."""
  rows, skipped = [], 0
  for where, row in readers.iter_rows(path):
    if isinstance(row, readers.DataError):
      if on_bad_row == "error":
        raise readers.DataError(f"{row} {_SKIP_HINT}", row.reason)
      skipped += 1
      logger.warning("skipping unreadable row: %s", row)
      continue
    rows.append((where, row))
  if skipped:
    logger.warning("%s: skipped %d unreadable row(s) of %d", path, skipped, skipped + len(rows))
  return rows


def _split_rows(input_path: str | None, splits: Mapping[str, str | float] | None, seed: int,
                on_bad_row: str) -> dict[str, list[tuple[str, dict[str, Any]]]]:
  """(where, row) lists per split."""
  if splits is None:
    if input_path is None:
      raise ValueError("give input_path or splits={split: path}")
    splits = {"train": input_path}
  if not splits:
    raise ValueError("splits is empty")
  if all(isinstance(v, str) or isinstance(v, os.PathLike) for v in splits.values()):
    return {split: _readable_rows(os.fspath(path), on_bad_row) for split, path in splits.items()}
  if input_path is None:
    raise ValueError(f"splits={dict(splits)} are fractions; give the input_path they split")
  fractions = {split: float(f) for split, f in splits.items()}
  if any(f <= 0 for f in fractions.values()) or sum(fractions.values()) > 1 + 1e-9:
    raise ValueError(f"split fractions {fractions} must be > 0 and sum to <= 1")
  rows = _readable_rows(input_path, on_bad_row)
  order = np.random.default_rng(seed).permutation(len(rows))
  out, start = {}, 0
  for split, fraction in fractions.items():
    stop = start + int(round(fraction * len(rows)))
    out[split] = [rows[i] for i in sorted(order[start:stop])]
    start = stop
  return out


def _examples(rows: list[tuple[str, dict[str, Any]]], fmt: str, source: str, on_bad_row: str
              ) -> Iterator[tuple[str, dict[str, Any]]]:
  """(key, features) per parsable row; bad rows raise or are skipped with a logged count."""
  skipped = 0
  for index, (where, row) in enumerate(rows):
    try:
      record = sources.parse_any_row(row, fmt, where, source)
    except readers.DataError as e:
      if on_bad_row == "error":
        raise readers.DataError(f"{e} {_SKIP_HINT}", e.reason) from e
      skipped += 1
      logger.warning("skipping bad row: %s", e)
      continue
    label = -1 if record.label is None else int(record.label)
    yield f"{index:012d}", {"row_json": sources.row_to_json(row), "id": record.id,
                            "question": record.question, "label": label,
                            "has_critique": record.critique is not None}
  if skipped:
    logger.warning("skipped %d bad rows of %d (%s)", skipped, len(rows), source)


def _builder_class(dataset_name: str, dataset_version: str,
                   split_rows: dict[str, list[tuple[str, dict[str, Any]]]], fmt: str,
                   on_bad_row: str) -> type[tfds.core.GeneratorBasedBuilder]:
  """A one-off, unregistered GeneratorBasedBuilder over already-read rows."""

  class CritiqueRowsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Critique rows stored as original JSON plus typed fields."""
    name = dataset_name
    VERSION = tfds.core.Version(dataset_version)
    RELEASE_NOTES = {dataset_version: "Built by cftjax.data.tfds_builder.build_dataset."}
    # No source-code checksums to look up; TFDS 4.9.10's lookup needs `importlib_resources`
    # (not installed on Python >= 3.9) for builders defined inside a package.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(
          builder=self, description="Critique rows (original JSON in row_json), built by cftjax.",
          features=features(), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(rows) for split, rows in split_rows.items()}

    def _generate_examples(self, rows):
      return _examples(rows, fmt, dataset_name, on_bad_row)

    # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded" to stdout
    # for every build; nothing is downloaded here, and build_dataset logs what it wrote.
    def _log_download_bytes(self) -> None:
      pass

    def _log_download_done(self) -> None:
      pass

  return CritiqueRowsBuilder
