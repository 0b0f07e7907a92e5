"""CFT batches: packing / padding keep every token once, masks aligned, length policy counted."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from cftjax.data import critique, pipeline, readers, synthetic
from cftjax.tokenizer import Tokenizer
from tests.pipeline_helpers import cft_iterator


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  paths = synthetic.write_world(str(tmp_path_factory.mktemp("world")), seed=3, num_train=40,
                                num_heldout=4, digits=2)
  return paths, Tokenizer.from_dir(paths["tokenizer"])


def _config(paths, **overrides):
  cfg = {"sources": [{"path": paths["train"]}], "template": "cft", "max_seq_len": 256,
         "batch_size": 4, "num_epochs": 1, "seed": 5}
  return {**cfg, **overrides}


def _reference_examples(paths, tokenizer):
  """Per-example (inputs, targets, loss_mask) tuples rendered without the pipeline."""
  out = []
  for record in readers.load_records(paths["train"]):
    ids, mask = critique.render_cft(record, "cft", tokenizer)
    out.append((tuple(ids[:-1]), tuple(ids[1:]), tuple(np.asarray(mask[1:], np.float32))))
  return out


def _segments(batches):
  """(inputs, targets, loss_mask) tuples, one per packed segment, in batch order."""
  found = []
  for batch in batches:
    for row, seg in enumerate(batch["segment_ids"]):
      for s in np.unique(seg[seg > 0]):
        found.append(tuple(tuple(batch[k][row][seg == s]) for k in pipeline.CFT_KEYS))
  return found


def _check_rows(batch, seq_len):
  """Format of interfaces.md; padding inert; segments 1..k contiguous; positions restart."""
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "inputs": ((4, seq_len), np.int32), "targets": ((4, seq_len), np.int32),
      "loss_mask": ((4, seq_len), np.float32), "positions": ((4, seq_len), np.int32),
      "segment_ids": ((4, seq_len), np.int32)}
  for row, seg in enumerate(batch["segment_ids"]):
    pad = seg == 0
    assert not batch["loss_mask"][row][pad].any() and not batch["inputs"][row][pad].any()
    real = seg[~pad]
    assert np.all(pad[len(real):]) and np.all(np.diff(real) == (np.diff(real) > 0))
    assert len(real) == 0 or real[0] == 1
    for s in np.unique(real):
      where = seg == s
      np.testing.assert_array_equal(batch["positions"][row][where], np.arange(where.sum()))
      inputs, targets = batch["inputs"][row][where], batch["targets"][row][where]
      np.testing.assert_array_equal(inputs[1:], targets[:-1])  # the shift stays in the segment


@pytest.mark.parametrize("packing", [True, False])
def test_one_epoch_holds_every_example_once_with_aligned_masks(world, packing):
  paths, tokenizer = world
  it = cft_iterator(_config(paths, packing=packing), tokenizer)
  batches = list(it)
  for batch in batches:
    _check_rows(batch, 256)
  found = _segments(batches)
  reference = _reference_examples(paths, tokenizer)
  assert collections.Counter(found) == collections.Counter(reference)
  assert it.length_counts["kept"] == len(reference) == 40
  critiques = {f"Critique:\n{r.critique}<|im_end|>" for r in readers.load_records(paths["train"])}
  trained_text = {tokenizer.decode([t for t, m in zip(targets, mask) if m])
                  for _, targets, mask in found}
  assert trained_text == critiques
  rows_used = sum(int((b["segment_ids"] > 0).any(axis=1).sum()) for b in batches)
  assert rows_used == (len(reference) if not packing else pytest.approx(20, abs=1))


def test_packing_fills_rows(world):
  paths, tokenizer = world
  batches = list(cft_iterator(_config(paths), tokenizer))
  lengths = [len(e[0]) for e in _reference_examples(paths, tokenizer)]
  per_row = 256 // max(lengths)  # examples that always fit in one row
  assert per_row >= 2
  rows_used = sum(int((b["segment_ids"] > 0).any(axis=1).sum()) for b in batches)
  assert rows_used <= -(-len(lengths) // per_row)  # at least as tight as packing per_row per row
  assert max(int(b["segment_ids"].max()) for b in batches) >= per_row


def test_length_policy_drop_counts_and_error(world):
  paths, tokenizer = world
  lengths = [len(e[0]) for e in _reference_examples(paths, tokenizer)]
  limit = int(np.median(lengths))
  too_long = sum(n > limit for n in lengths)
  assert 0 < too_long < len(lengths)
  it = cft_iterator(_config(paths, max_seq_len=limit, length_policy="drop"), tokenizer)
  found = _segments(list(it))
  assert len(found) == len(lengths) - too_long and all(len(f[0]) <= limit for f in found)
  assert it.length_counts == {"seen": 40, "kept": 40 - too_long, "truncated": 0,
                              "dropped_too_long": too_long, "dropped_no_target": 0,
                              "dropped_bad_row": 0}
  with pytest.raises(ValueError, match="max_seq_len"):
    list(cft_iterator(_config(paths, max_seq_len=limit, length_policy="error"), tokenizer))


def test_length_policy_truncate_keeps_prefix(world):
  paths, tokenizer = world
  reference = _reference_examples(paths, tokenizer)
  limit = int(np.median([len(e[0]) for e in reference]))
  it = cft_iterator(_config(paths, max_seq_len=limit, length_policy="truncate"), tokenizer)
  found = collections.Counter(_segments(list(it)))
  assert found == collections.Counter(tuple(part[:limit] for part in e) for e in reference)
  assert it.length_counts["truncated"] == sum(len(e[0]) > limit for e in reference) > 0


def test_truncation_that_removes_all_targets_is_counted(world):
  paths, tokenizer = world
  it = cft_iterator(_config(paths, max_seq_len=20, length_policy="truncate"), tokenizer)
  assert list(it) == []
  assert it.length_counts["dropped_no_target"] == 40
