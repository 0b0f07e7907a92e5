"""The pipeline iterators called with flat test configs: one dict holding keys of the config's `data`
section (set on `base_config().data`) and the iterators' stream keyword arguments."""

from __future__ import annotations

from typing import Any

from cftjax import config as config_lib
from cftjax.data import pipeline

STREAM_KEYS = ("sources", "batch_size", "num_epochs", "num_workers", "max_prompt_len")


def split_config(cfg: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  """(the locked base config's data section with cfg's other keys set, the stream keyword arguments;
  num_epochs None unless given)."""
  config = config_lib.base_config()
  config.lock()
  config.data.update({key: value for key, value in cfg.items() if key not in STREAM_KEYS})
  return config.data, {"num_epochs": None, **{k: v for k, v in cfg.items() if k in STREAM_KEYS}}


def cft_iterator(cfg: dict[str, Any], tokenizer: Any, process_index: int = 0,
                 process_count: int = 1) -> pipeline.DataIterator:
  data, stream = split_config(cfg)
  return pipeline.make_cft_iterator(data, tokenizer, **stream, process_index=process_index,
                                    process_count=process_count)


def rl_iterator(cfg: dict[str, Any], tokenizer: Any, process_index: int = 0,
                process_count: int = 1) -> pipeline.DataIterator:
  data, stream = split_config(cfg)
  return pipeline.make_rl_iterator(data, tokenizer, **stream, process_index=process_index,
                                   process_count=process_count)
