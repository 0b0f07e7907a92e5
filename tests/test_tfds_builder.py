"""cftjax.data.tfds_builder: versioned ArrayRecord TFDS datasets, read back by the pipelines."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cftjax.data import readers, synthetic, tfds_builder
from cftjax.tokenizer import Tokenizer
from tests.pipeline_helpers import cft_iterator


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  paths = synthetic.write_world(str(tmp_path_factory.mktemp("world")), seed=5, num_train=30,
                                num_heldout=6, digits=2)
  return paths, Tokenizer.from_dir(paths["tokenizer"])


def test_build_writes_versioned_array_record_dataset(world, tmp_path):
  paths, _ = world
  out = tfds_builder.build_dataset(None, str(tmp_path), name="critiques", version="1.2.0",
                                   splits={"train": paths["train"], "heldout": paths["heldout"]})
  assert out == os.path.join(str(tmp_path), "critiques", "1.2.0")
  files = sorted(os.listdir(out))
  assert "dataset_info.json" in files
  assert any(f.startswith("critiques-train.array_record") for f in files)
  source = tfds.data_source("critiques", data_dir=str(tmp_path), split="heldout")
  rows = [row for _, row in readers.read_rows(paths["heldout"])]
  assert len(source) == len(rows)
  for i, row in enumerate(rows):  # rows keep file order
    example = source[i]
    assert json.loads(example["row_json"]) == row
    assert example["question"].decode() == row["question"]
    assert int(example["label"]) == int(row["label"]) and bool(example["has_critique"])


def test_pipeline_reads_tfds_exactly_like_the_jsonl(world, tmp_path):
  paths, tokenizer = world
  out = tfds_builder.build_dataset(paths["train"], str(tmp_path), name="train")
  cfg = {"template": "cft", "max_seq_len": 256, "batch_size": 4, "seed": 3, "num_epochs": 1}
  from_jsonl = list(cft_iterator({**cfg, "sources": [{"path": paths["train"]}]}, tokenizer))
  from_tfds = list(cft_iterator({**cfg, "sources": [{"path": os.path.dirname(out), "kind": "tfds"}]},
                                tokenizer))
  assert len(from_jsonl) == len(from_tfds) > 0
  for a, b in zip(from_jsonl, from_tfds):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_fraction_splits_partition_the_rows(world, tmp_path):
  paths, _ = world
  out = tfds_builder.build_dataset(paths["train"], str(tmp_path), name="split",
                                   splits={"train": 0.8, "validation": 0.2}, seed=1)
  builder = tfds.builder_from_directory(out)
  ids = {split: [json.loads(e["row_json"])["id"] for e in builder.as_data_source(split)]
         for split in ("train", "validation")}
  assert (len(ids["train"]), len(ids["validation"])) == (24, 6)
  assert sorted(ids["train"] + ids["validation"]) == sorted(
      r.id for r in readers.load_records(paths["train"]))


def test_bad_rows_error_names_the_line_or_are_skipped(world, tmp_path):
  paths, _ = world
  lines = open(paths["heldout"], encoding="utf-8").read().splitlines()
  lines[2] = json.dumps({"something": "else"})
  bad = tmp_path / "bad.jsonl"
  bad.write_text("\n".join(lines) + "\n")
  with pytest.raises(readers.DataError, match="bad.jsonl line 3"):
    tfds_builder.build_dataset(str(bad), str(tmp_path / "a"), name="bad")
  out = tfds_builder.build_dataset(str(bad), str(tmp_path / "b"), name="bad", on_bad_row="skip")
  assert len(tfds.builder_from_directory(out).as_data_source("train")) == len(lines) - 1


def test_existing_version_and_bad_names_are_refused(world, tmp_path):
  paths, _ = world
  tfds_builder.build_dataset(paths["heldout"], str(tmp_path), name="held")
  with pytest.raises(FileExistsError, match="already exists; choose another version"):
    tfds_builder.build_dataset(paths["heldout"], str(tmp_path), name="held")
  tfds_builder.build_dataset(paths["heldout"], str(tmp_path), name="held", overwrite=True)
  with pytest.raises(ValueError, match="snake_case"):
    tfds_builder.build_dataset(paths["heldout"], str(tmp_path), name="Held-Out")
