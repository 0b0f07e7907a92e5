"""Datasets downloaded elsewhere used as they are: HF `datasets` directories (save_to_disk output and
hub-snapshot Parquet layouts), TFDS splits for held-out eval, and the held-out rows rendered with the
training sources' template (`data.template` may be a dict)."""

from __future__ import annotations

import os
import textwrap

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cftjax import config as config_lib
from cftjax.config import ConfigError
from cftjax.data import critique, pipeline, sources, synthetic, tfds_builder
from cftjax.eval import heldout

TRAIN = [{"question": f"What is {i} + 1?", "solution": str(i + 1), "critique": "Conclusion: right",
          "level": i % 3} for i in range(5)]
TEST = [{"question": f"What is {i} + 2?", "solution": str(i), "critique": "Conclusion: wrong"}
        for i in range(3)]


def _questions(spec):
  dataset, info = sources.open_source(spec)
  return info.kind, [dataset[i].question for i in range(len(dataset))]


def test_save_to_disk_dataset_dict_and_dataset(tmp_path):
  datasets.DatasetDict({"train": datasets.Dataset.from_list(TRAIN),
                        "test": datasets.Dataset.from_list(TEST)}).save_to_disk(str(tmp_path / "dd"))
  assert _questions({"path": str(tmp_path / "dd")}) == ("hf_datasets", [r["question"] for r in TRAIN])
  assert _questions({"path": str(tmp_path / "dd"), "split": "test"})[1] == [r["question"] for r in TEST]
  with pytest.raises(ValueError, match=r"no split 'validation'; available: \['test', 'train'\]"):
    sources.open_source({"path": str(tmp_path / "dd"), "split": "validation"})
  datasets.Dataset.from_list(TRAIN).save_to_disk(str(tmp_path / "one"), num_shards=2)
  dataset, _ = sources.open_source({"path": str(tmp_path / "one")})
  assert [dataset[i].question for i in range(len(dataset))] == [r["question"] for r in TRAIN]
  assert dataset[0].metadata == {"level": 0}


def test_hub_snapshot_parquet_layout(tmp_path):
  snapshot = tmp_path / "snapshot"
  (snapshot / "data").mkdir(parents=True)
  (snapshot / "README.md").write_text("---\nconfigs: [{config_name: default}]\n---\n")
  pq.write_table(pa.Table.from_pylist(TRAIN[:3]), snapshot / "data" / "train-00000-of-00002.parquet")
  pq.write_table(pa.Table.from_pylist(TRAIN[3:]), snapshot / "data" / "train-00001-of-00002.parquet")
  pq.write_table(pa.Table.from_pylist(TEST), snapshot / "data" / "test-00000-of-00001.parquet")
  assert _questions({"path": str(snapshot)}) == ("hf_datasets", [r["question"] for r in TRAIN])
  assert _questions({"path": str(snapshot), "split": "test"})[1] == [r["question"] for r in TEST]


def _data_section(**keys):
  config = config_lib.base_config()
  config.lock()
  config.data.update(keys)
  return config.data


def test_heldout_rows_from_a_tfds_split(tmp_path):
  paths = synthetic.write_world(str(tmp_path / "world"), num_train=20, num_heldout=4)
  out = tfds_builder.build_dataset(paths["train"], str(tmp_path / "tfds"), name="rows",
                                   splits={"train": 0.75, "heldout": 0.25})
  data = _data_section(train_path=paths["train"], eval_path=os.path.dirname(out), eval_split="heldout")
  records = heldout.labelled_records(pipeline.eval_source(data), limit=100)
  heldout_ids = {r.id for r in sources.open_source({"path": out, "split": "heldout"})[0]}
  assert len(records) == 5 and {r.id for r in records} == heldout_ids
  with pytest.raises(ValueError, match=r"has splits \['heldout', 'train'\]; name one"):
    heldout.labelled_records(pipeline.eval_source(_data_section(train_path=paths["train"], eval_path=out)),
                             limit=100)


def test_template_dict_and_eval_template_follow_the_training_sources(tmp_path):
  config_file = tmp_path / "config.py"
  config_file.write_text(textwrap.dedent("""
      from cftjax.config import base_config
      def get_config():
        c = base_config()
        c.data.template = {"system": "Grade it.", "user": "{question} = {solution}?", "assistant": "{critique}"}
        c.data.train_path = "train.jsonl"
        return c
      """))
  config = config_lib.load_config(str(config_file))
  assert pipeline.eval_source(config.data)["template"] == critique.get_template(
      {"system": "Grade it.", "user": "{question} = {solution}?", "assistant": "{critique}"})
  data = _data_section(sources=({"path": "a.jsonl", "template": "crl"},), eval_path="e.jsonl")
  assert pipeline.eval_source(data)["template"].name == "crl"  # not data.template ('cft')
  mixed = _data_section(sources=({"path": "a.jsonl", "template": "crl"}, {"path": "b.jsonl"}))
  with pytest.raises(ConfigError, match="set data.eval_template"):
    pipeline.eval_source(mixed)
  mixed.eval_template = "crl"
  assert pipeline.eval_source(mixed)["template"] == "crl"
