"""cftjax.data pipelines: resume, host shards, mixtures, RL batches, sources, config, inspect."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cftjax import config as config_lib
from cftjax.data import preview
from cftjax.data import critique, pipeline, readers, sources, synthetic
from cftjax.data.critique import CritiqueRecord
from cftjax.tokenizer import Tokenizer
from tests.pipeline_helpers import cft_iterator, rl_iterator, split_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  paths = synthetic.write_world(str(tmp_path_factory.mktemp("world")), seed=4, num_train=40,
                                num_heldout=4, digits=2, carry_out=True)
  return paths, Tokenizer.from_dir(paths["tokenizer"])


def _cft_config(paths, **overrides):
  cfg = {"sources": [{"path": paths["train"]}, {"path": paths["heldout"], "weight": 0.25}],
         "template": "cft", "max_seq_len": 128, "batch_size": 4, "seed": 11}
  return {**cfg, **overrides}


def _rl_config(paths, **overrides):
  cfg = {"sources": [{"path": paths["rl_math_train"], "task": "math", "template": "math_cot"}],
         "template": "crl", "max_seq_len": 256, "max_prompt_len": 256, "batch_size": 4, "seed": 2}
  return {**cfg, **overrides}


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from cftjax.tokenizer import Tokenizer
    from tests.pipeline_helpers import cft_iterator
    cfg, tokenizer_dir, state_path, out_path, n = sys.argv[1:6]
    it = cft_iterator(json.loads(cfg), Tokenizer.from_dir(tokenizer_dir))
    with open(state_path) as f:
      it.set_state(json.load(f))
    batches = [next(it) for _ in range(int(n))]
    np.savez(out_path, **{f"{i}_{k}": v for i, b in enumerate(batches) for k, v in b.items()})
    print(json.dumps(it.length_counts))
""")


def test_resume_in_fresh_process_sees_the_same_batches(world, tmp_path):
  paths, tokenizer = world
  cfg = _cft_config(paths, max_seq_len=100, length_policy="drop")  # drops some
  it = cft_iterator(cfg, tokenizer)
  _take(it, 5)
  state_path = tmp_path / "state.json"
  state_path.write_text(json.dumps(it.get_state()))
  expected = _take(it, 4)
  out = tmp_path / "resumed.npz"
  env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  result = subprocess.run(
      [sys.executable, "-c", RESUME_SCRIPT, json.dumps(cfg), paths["tokenizer"], str(state_path),
       str(out), "4"], capture_output=True, text=True, env=env, check=False, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  saved = np.load(out)
  resumed = [{k: saved[f"{i}_{k}"] for k in expected[0]} for i in range(4)]
  _assert_same_batches(resumed, expected)
  assert json.loads(result.stdout.strip().splitlines()[-1]) == it.length_counts
  assert it.length_counts["dropped_too_long"] > 0


def test_worker_processes_give_the_same_batches_and_resume(world):
  paths, tokenizer = world
  serial = _take(cft_iterator(_cft_config(paths), tokenizer), 6)
  with cft_iterator(_cft_config(paths, num_workers=1), tokenizer) as it:
    _assert_same_batches(_take(it, 3), serial[:3])
    state = json.loads(json.dumps(it.get_state()))
    _assert_same_batches(_take(it, 3), serial[3:])
    it.set_state(state)
    _assert_same_batches(_take(it, 3), serial[3:])


def _rl_ids(cfg, tokenizer, process_index, process_count):
  batches = list(rl_iterator(cfg, tokenizer, process_index, process_count))
  assert all(len(b) == cfg["batch_size"] // process_count for b in batches[:-1])
  return [p["record"].id for b in batches for p in b]


def test_two_hosts_see_every_row_once_per_epoch(world):
  paths, tokenizer = world
  cfg = _rl_config(paths, num_epochs=2)
  hosts = [_rl_ids(cfg, tokenizer, i, 2) for i in range(2)]
  all_ids = [r.id for r in readers.load_records(paths["rl_math_train"])]
  for epoch in range(2):
    seen = [ids[epoch * 20:(epoch + 1) * 20] for ids in hosts]  # 40 rows -> 20 per host per epoch
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(all_ids)
  assert hosts[0][:20] != hosts[0][20:], "each epoch is reshuffled"
  assert all(len(ids) == 40 for ids in hosts)


def test_mixture_weights_and_epoch(world):
  paths, tokenizer = world
  sources_spec = [
      {"path": paths["rl_math_train"], "task": "math", "template": "math_cot", "weight": 0.8},
      {"path": paths["rl_crl_heldout"], "task": "crl", "name": "crl", "weight": 0.2}]
  prompts = [p for b in rl_iterator(
      _rl_config(paths, sources=sources_spec, num_epochs=1), tokenizer) for p in b]
  # 40 math rows at weight 0.8 set the epoch: 40 math + 10 crl (4 crl rows cycled).
  counts = collections.Counter(p["task"] for p in prompts)
  assert counts == {"math": 40, "crl": 10}
  assert sorted(p["record"].id for p in prompts if p["task"] == "math") == sorted(
      r.id for r in readers.load_records(paths["rl_math_train"]))
  first = prompts[:20]
  assert 2 <= sum(p["task"] == "crl" for p in first) <= 6, "components interleave evenly"
  assert {p["source"] for p in prompts} == {"rl_math_train", "crl"}


def test_rl_prompt_batches_match_render_prompt(world):
  paths, tokenizer = world
  batch = next(rl_iterator(_rl_config(paths), tokenizer))
  assert len(batch) == 4
  for prompt in batch:
    assert set(prompt) == {"prompt_ids", "record", "source", "task"}
    assert isinstance(prompt["record"], CritiqueRecord) and prompt["task"] == "math"
    assert prompt["prompt_ids"].dtype == np.int32 and prompt["prompt_ids"].ndim == 1
    np.testing.assert_array_equal(
        prompt["prompt_ids"], critique.render_prompt(prompt["record"], "math_cot", tokenizer))


def test_rl_over_long_prompts_are_dropped_and_counted(world):
  paths, tokenizer = world
  lengths = [len(critique.render_prompt(r, "crl", tokenizer))
             for r in readers.load_records(paths["rl_crl_train"])]
  limit = max(lengths) - 1
  crl = [{"path": paths["rl_crl_train"], "task": "crl"}]
  it = rl_iterator(_rl_config(paths, sources=crl, num_epochs=1, max_prompt_len=limit),
                                 tokenizer)
  prompts = [p for b in it for p in b]
  assert all(len(p["prompt_ids"]) <= limit for p in prompts)
  assert it.length_counts["dropped_too_long"] == sum(n > limit for n in lengths) > 0
  assert len(prompts) == it.length_counts["kept"] == 40 - it.length_counts["dropped_too_long"]


def _write_all_kinds(paths, tmp_path):
  rows = [row for _, row in readers.read_rows(paths["train"])]
  parquet = str(tmp_path / "train.parquet")
  pq.write_table(pa.Table.from_pylist(rows), parquet)
  array_record = str(tmp_path / "train.array_record")
  assert sources.write_array_record(rows, array_record) == len(rows)
  from cftjax.data import tfds_builder  # pylint: disable=import-outside-toplevel
  tfds_dir = tfds_builder.build_dataset(paths["train"], str(tmp_path / "tfds"), name="train")
  return {"jsonl": paths["train"], "parquet": parquet, "array_record": array_record,
          "tfds": tfds_dir}


def _fields(record):
  return (record.question, record.solution, record.critique, record.label,
          record.reference_answer)


def test_every_source_kind_reads_the_same_records(world, tmp_path):
  paths, _ = world
  expected = [_fields(r) for r in readers.load_records(paths["train"])]
  for kind, path in _write_all_kinds(paths, tmp_path).items():
    dataset, info = sources.open_source({"path": path})
    assert info.kind == kind and info.num_rows == len(expected) and info.name == "train"
    assert [_fields(dataset[i]) for i in range(len(dataset))] == expected, kind
    assert {dataset[i].source for i in range(3)} == {"train"}


def test_bad_array_record_rows_error_or_skip(world, tmp_path):
  paths, tokenizer = world
  rows = [row for _, row in readers.read_rows(paths["train"])][:5]
  rows[2] = {"unrelated": 1}
  path = str(tmp_path / "bad.array_record")
  sources.write_array_record(rows, path)
  dataset, _ = sources.open_source({"path": path}, on_bad_row="error")
  with pytest.raises(readers.DataError, match=r"bad.array_record\[2\]"):
    _ = dataset[2]
  dataset, _ = sources.open_source({"path": path}, on_bad_row="skip")
  assert dataset[2] is None and dataset[3] is not None
  assert len(list(dataset.to_iter_dataset())) == 4
  cfg = {"sources": [{"path": path}], "template": "cft", "max_seq_len": 256, "max_prompt_len": 256,
         "batch_size": 2, "num_epochs": 2, "on_bad_row": "skip"}
  it = rl_iterator(cfg, tokenizer)
  assert sum(len(b) for b in it) == 8
  assert it.length_counts["dropped_bad_row"] == 2 and it.length_counts["seen"] == 10


def test_config_errors_name_the_key(world):
  paths, tokenizer = world
  with pytest.raises(config_lib.ConfigError, match="'config.data.max_len'"):
    config_lib.set_override(config_lib.base_config(), "data.max_len", "3")
  bad_source = _cft_config(paths, sources=[{"path": paths["train"], "wieght": 2}])
  with pytest.raises(ValueError, match=r"sources\[0\].*'wieght'"):
    cft_iterator(bad_source, tokenizer)
  with pytest.raises(config_lib.ConfigError, match="data.length_policy"):
    cft_iterator(_cft_config(paths, length_policy="clip"), tokenizer)
  with pytest.raises(config_lib.ConfigError, match="not divisible"):
    cft_iterator(_cft_config(paths, batch_size=3), tokenizer, 0, 2)


def test_train_path_lists_comma_separated_sources(world):
  paths, tokenizer = world
  data = config_lib.base_config().data
  data.train_path = f"{paths['train']}, {paths['heldout']}"
  assert pipeline.train_sources(data) == [{"path": paths["train"], "format": "auto"},
                                          {"path": paths["heldout"], "format": "auto"}]
  data.sources = ({"path": paths["heldout"], "weight": 0.5},)
  assert pipeline.train_sources(data) == [{"path": paths["heldout"], "weight": 0.5}]
  data.sources, data.train_path = (), ""
  with pytest.raises(config_lib.ConfigError, match="data.train_path"):
    pipeline.train_sources(data)
  cfg = _cft_config(paths, sources=[{"path": paths["train"]}, {"path": paths["heldout"]}])
  data, stream = split_config(cfg)
  data.train_path = f"{paths['train']},{paths['heldout']}"
  stream["sources"] = pipeline.train_sources(data)
  _assert_same_batches(_take(pipeline.make_cft_iterator(data, tokenizer, **stream), 2),
                       _take(cft_iterator(cfg, tokenizer), 2))


def test_inspect_shows_mask_and_histogram(world):
  paths, tokenizer = world
  data, stream = split_config(_cft_config(paths, max_seq_len=100))
  data.sources = stream["sources"]
  report = preview.inspect_dataset(data, tokenizer, num_examples=2)
  record = readers.load_records(paths["train"])[0]
  assert report.count("[[Critique:") == 2 and "Conclusion:" in report
  assert "< max_seq_len=100" in report and "(dropped)" in report
  assert f"source 'train' (jsonl, {paths['train']}): {40} rows" in report
  assert record.question.split("?")[0] in "".join(
      r.question for r in readers.load_records(paths["train"]))
