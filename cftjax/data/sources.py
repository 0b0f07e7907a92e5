"""Random-access CritiqueRecord sources (JSONL, Parquet, ArrayRecord, TFDS, HF `datasets` directories)
behind `open_source`.

A source spec names a file (or TFDS dataset directory) and how to read it; see docs/data.md.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import grain

from cftjax.data import readers
from cftjax.data.critique import CritiqueRecord

logger = logging.getLogger(__name__)

SOURCE_KINDS = ("auto", "jsonl", "parquet", "array_record", "tfds", "hf_datasets")
TASKS = ("auto", *readers.TASKS)  # auto: each row's own task (verl rows have one), else "cft"
SOURCE_DEFAULTS: dict[str, Any] = {
    "path": None, "format": "auto", "kind": "auto", "split": "train", "weight": 1.0, "name": None,
    "task": "auto", "template": None,
}
_ROW_JSON_FEATURE = "row_json"  # TFDS feature holding the original row (see tfds_builder.py)


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """What `open_source` opened: resolved kind, row count and the normalised spec."""
  name: str
  kind: str
  path: str
  split: str
  num_rows: int
  weight: float
  task: str
  template: Any
  skipped_rows: dict[str, int] | None  # skipped at open time, by reason; None: parsed lazily


def normalize_source_spec(spec: Mapping[str, Any], where: str = "source") -> dict[str, Any]:
  """Fills defaults into a source spec and validates it; `where` names it in errors."""
  spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
  unknown = sorted(set(spec) - set(SOURCE_DEFAULTS))
  if unknown:
    raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {sorted(SOURCE_DEFAULTS)}")
  spec = {**SOURCE_DEFAULTS, **spec}
  if not spec["path"]:
    raise ValueError(f"{where}: 'path' is required (a JSONL/Parquet/ArrayRecord file or TFDS dir)")
  spec["path"] = os.fspath(spec["path"])
  if spec["kind"] not in SOURCE_KINDS:
    raise ValueError(f"{where}: kind={spec['kind']!r} is not one of {SOURCE_KINDS}")
  if spec["task"] not in TASKS:
    raise ValueError(f"{where}: task={spec['task']!r} is not one of {TASKS}")
  if not float(spec["weight"]) > 0:
    raise ValueError(f"{where}: weight={spec['weight']!r} must be > 0")
  spec["weight"] = float(spec["weight"])
  if spec["kind"] == "auto":
    spec["kind"] = detect_kind(spec["path"])
  if spec["name"] is None:
    spec["name"] = _default_name(spec["path"])
  return spec


def _default_name(path: str) -> str:
  """File name without extensions; for a TFDS version dir (.../name/1.0.0) the dataset name."""
  path = os.path.normpath(path)
  if _is_version(os.path.basename(path)):
    path = os.path.dirname(path)
  base = os.path.basename(path)
  return base.split(".")[0] or base


def _is_version(text: str) -> bool:
  parts = text.split(".")
  return len(parts) == 3 and all(p.isdigit() for p in parts)


def detect_kind(path: str) -> str:
  """Source kind from the path: HF `datasets` dir, TFDS dataset dir, ArrayRecord file/dir/glob,
  Parquet or JSONL."""
  if os.path.isdir(path):
    if _is_tfds_dir(path) or _tfds_version_dirs(path):
      return "tfds"
    if is_hf_dataset_dir(path):
      return "hf_datasets"
    if _array_record_files(path):
      return "array_record"
    raise ValueError(f"{path}: directory holds no HF `datasets` data (save_to_disk output or "
                     ".parquet/.arrow/.jsonl files), no TFDS dataset (dataset_info.json) and no "
                     "*.array_record files; set the source's 'kind' explicitly")
  name = path.lower()
  if "array_record" in name or "arrayrecord" in name:
    return "array_record"
  if name.endswith((".parquet", ".pq")):
    return "parquet"
  if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
    return "jsonl"
  raise ValueError(f"{path}: cannot tell the source kind from the name; set the source's 'kind' "
                   f"to one of {SOURCE_KINDS[1:]}")


def _is_tfds_dir(path: str) -> bool:
  """TFDS writes dataset_info.json; HF `save_to_disk` does too, next to its state.json."""
  return (os.path.isfile(os.path.join(path, "dataset_info.json"))
          and not os.path.isfile(os.path.join(path, HF_STATE_FILE)))


def _tfds_version_dirs(path: str) -> list[str]:
  """Version subdirectories (x.y.z) of a TFDS dataset dir that hold a prepared dataset."""
  versions = []
  for entry in os.listdir(path):
    if _is_version(entry) and _is_tfds_dir(os.path.join(path, entry)):
      versions.append(entry)
  return sorted(versions, key=lambda v: tuple(int(p) for p in v.split(".")))


def _array_record_files(path: str) -> list[str]:
  if os.path.isdir(path):
    return sorted(glob.glob(os.path.join(path, "*array_record*")))
  if glob.has_magic(path):
    return sorted(glob.glob(path))
  return [path] if os.path.exists(path) else []


# ------------------------------------------------------------------------------------------------
# Hugging Face `datasets` directories, read without the `datasets` library: `save_to_disk` output
# (Arrow files listed in state.json; one folder per split under dataset_dict.json) and hub snapshots
# (.parquet / .arrow / .jsonl files named or foldered by split, e.g. data/train-00000-of-00001.parquet).

HF_DATASET_DICT_FILE = "dataset_dict.json"  # save_to_disk of a DatasetDict: {"splits": [...]}
HF_STATE_FILE = "state.json"  # save_to_disk of one Dataset: {"_data_files": [{"filename": ...}], ...}
HF_DATA_EXTENSIONS = (".parquet", ".arrow", ".jsonl")
_SPLIT_OF_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9_]*?)(?:[-.]|$)")


def is_hf_dataset_dir(path: str) -> bool:
  """A `save_to_disk` directory, or a directory tree holding data files."""
  if os.path.isfile(os.path.join(path, HF_DATASET_DICT_FILE)) or os.path.isfile(os.path.join(path, HF_STATE_FILE)):
    return True
  return bool(_hf_data_files(path))


def _hf_data_files(root: str) -> list[str]:
  files = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # skip .cache, .git
    files += [os.path.join(directory, n) for n in sorted(names) if n.endswith(HF_DATA_EXTENSIONS)]
  return files


def _saved_split_files(split_dir: str) -> list[str]:
  """The Arrow files of one `save_to_disk` Dataset, in the order state.json lists them."""
  with open(os.path.join(split_dir, HF_STATE_FILE), encoding="utf-8") as f:
    state = json.load(f)
  return [os.path.join(split_dir, entry["filename"]) for entry in state["_data_files"]]


def hf_split_of(path: str, root: str) -> str:
  """The split a hub-snapshot data file belongs to: its file name's leading word (train-0000.parquet,
  test.jsonl), else the nearest folder named like a split (train/0000.parquet)."""
  parts = os.path.relpath(path, root).split(os.sep)
  for name in reversed(parts):
    match = _SPLIT_OF_NAME.match(name)
    if match and match.group(1) not in ("data", "default"):
      return match.group(1)
  return "train"


def hf_splits(path: str) -> dict[str, list[str]]:
  """{split: its data files} of a HF datasets directory."""
  dict_file = os.path.join(path, HF_DATASET_DICT_FILE)
  if os.path.isfile(dict_file):
    with open(dict_file, encoding="utf-8") as f:
      names = json.load(f)["splits"]
    return {name: _saved_split_files(os.path.join(path, name)) for name in names}
  if os.path.isfile(os.path.join(path, HF_STATE_FILE)):
    return {"train": _saved_split_files(path)}
  found: dict[str, list[str]] = {}
  for file in _hf_data_files(path):
    found.setdefault(hf_split_of(file, path), []).append(file)
  return found


def hf_split_files(path: str, split: str) -> list[str]:
  """The data files of `split` ("" = the directory's only split); an unknown split is an error
  listing the available ones."""
  available = hf_splits(path)
  if not available:
    raise FileNotFoundError(f"{path}: no data files ({', '.join(HF_DATA_EXTENSIONS)}) found")
  return available[readers.pick_split(path, split, list(available))]


@dataclasses.dataclass(frozen=True)
class BadRow:
  """A lazily parsed row that failed (on_bad_row="mark"): pipelines count and skip it."""
  where: str
  reason: str
  message: str


class _JsonRowParser:
  """Parses one stored original row (JSON bytes/str) into a CritiqueRecord, lazily, per index."""

  def __init__(self, fmt: str, origin: str, source: str, on_bad_row: str,
               row_key: str | None = None):
    self.fmt = fmt
    self.origin = origin
    self.source = source
    self.on_bad_row = on_bad_row
    self.row_key = row_key

  def __call__(self, index: int, stored: Any) -> CritiqueRecord | BadRow | None:
    where = f"{self.origin}[{index}]"
    try:
      return parse_json_row(stored[self.row_key] if self.row_key else stored, self.fmt, where,
                            self.source)
    except readers.DataError as e:
      if self.on_bad_row == "mark":
        return BadRow(where, e.reason, str(e))
      if self.on_bad_row == "skip":
        logger.warning("skipping bad row: %s", e)
        return None
      raise readers.DataError(f"{e} (set on_bad_row='skip' to skip bad rows)", e.reason) from e


def parse_json_row(text: str | bytes, fmt: str, where: str, source: str) -> CritiqueRecord:
  """A stored JSON row -> CritiqueRecord; any problem is a DataError naming `where`."""
  try:
    row = json.loads(text)
  except ValueError as e:
    raise readers.DataError(f"{where}: stored row is not valid JSON ({e})", "bad_json") from e
  return parse_any_row(row, fmt, where, source)


def parse_any_row(row: dict[str, Any], fmt: str, where: str, source: str) -> CritiqueRecord:
  """readers.parse_row, detecting the row's format first when fmt is "auto"."""
  if fmt == "auto":
    fmt = readers.detect_format(row, where)
  return readers.parse_row(row, fmt, where, source=source)


def row_to_json(row: Mapping[str, Any]) -> str:
  """The original row as JSON text (numpy values from Parquet become lists / scalars)."""
  return json.dumps(row, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
  if hasattr(value, "tolist"):
    return value.tolist()
  if isinstance(value, bytes):
    return value.decode("utf-8")
  raise TypeError(f"cannot store a {type(value).__name__} value as JSON")


def open_source(spec: Mapping[str, Any], on_bad_row: str = "error"
                ) -> tuple[grain.MapDataset, SourceInfo]:
  """Opens one source spec as a random-access MapDataset of CritiqueRecord.

  on_bad_row: "error" raises at a bad row. Rows stored as JSON (ArrayRecord, TFDS) are parsed
  lazily when read: with "skip" a bad one reads as None (Grain drops it) and is logged, with "mark"
  as a BadRow (pipelines count those). JSONL / Parquet are parsed at once ("mark" = "skip").
  """
  if on_bad_row not in ("error", "skip", "mark"):
    raise ValueError(f"on_bad_row={on_bad_row!r} must be 'error', 'skip' or 'mark'")
  spec = normalize_source_spec(spec)
  kind, path = spec["kind"], spec["path"]
  if kind in ("jsonl", "parquet", "hf_datasets"):
    files = hf_split_files(path, spec["split"]) if kind == "hf_datasets" else path
    records = readers.load_records(files, fmt=spec["format"], source=spec["name"],
                                   on_bad_row="error" if on_bad_row == "error" else "skip")
    dataset = grain.MapDataset.source(records)
    skipped = dict(getattr(records, "skipped", {}))
  elif kind == "array_record":
    files = _array_record_files(path)
    if not files:
      raise FileNotFoundError(f"{path}: no ArrayRecord files found")
    parser = _JsonRowParser(spec["format"], path, spec["name"], on_bad_row)
    skipped = None
    dataset = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files))
    dataset = dataset.map_with_index(parser)
  else:
    split_source = _open_tfds_split(path, spec["split"])
    parser = _JsonRowParser(spec["format"], f"{path}:{spec['split']}", spec["name"], on_bad_row,
                            row_key=_ROW_JSON_FEATURE)
    skipped = None
    dataset = grain.MapDataset.source(split_source).map_with_index(parser)
  if len(dataset) == 0:
    raise ValueError(f"{path}: source {spec['name']!r} has no rows")
  info = SourceInfo(name=spec["name"], kind=kind, path=path, split=spec["split"],
                    num_rows=len(dataset), weight=spec["weight"], task=spec["task"],
                    template=spec["template"], skipped_rows=skipped)
  logger.info("opened source %s (%s, %s): %d rows", info.name, kind, path, info.num_rows)
  return dataset, info


def _open_tfds_split(path: str, split: str):
  """A TFDS random-access data source for `split` of the dataset at `path` (latest version)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  if not _is_tfds_dir(path):
    versions = _tfds_version_dirs(path) if os.path.isdir(path) else []
    if not versions:
      raise FileNotFoundError(f"{path}: not a TFDS dataset directory (no dataset_info.json); "
                              "build one with cftjax.data.tfds_builder.build_dataset")
    path = os.path.join(path, versions[-1])
  builder = tfds.builder_from_directory(path)
  split = readers.pick_split(path, split, list(builder.info.splits))
  if _ROW_JSON_FEATURE not in builder.info.features:
    raise ValueError(f"{path}: feature {_ROW_JSON_FEATURE!r} missing; cftjax reads TFDS datasets "
                     "built by cftjax.data.tfds_builder.build_dataset")
  return builder.as_data_source(split)


def write_array_record(rows: Iterable[Mapping[str, Any]], path: str) -> int:
  """Writes rows as JSON bytes, one ArrayRecord record each (random-access friendly); -> count."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
  count = 0
  try:
    for row in rows:
      writer.write(row_to_json(row).encode("utf-8"))
      count += 1
  finally:
    writer.close()
  return count
