"""Hugging Face safetensors import (`load_hf`) and export (`save_hf`), driven by one mapping table.

Reads without torch, streams tensor by tensor, and can place each param straight onto its sharding.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from cftjax.config import ConfigError
from cftjax.models.checkpoint_io import CheckpointError
from cftjax.models.config import ModelConfig
from cftjax.models.decoder import abstract_params

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class TensorMapping:
  """One HF tensor family <-> one cftjax param.

  `hf_name` has "{i}" for per-layer tensors, which stack on the param's leading "layers" axis.
  `to_param` maps one HF array to the param's (per-layer) layout; `to_hf` is its inverse.
  """

  hf_name: str
  path: tuple[str, ...]
  to_param: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf_name


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def _linear_to_heads(heads: int, head_dim: int) -> tuple[Callable, Callable]:
  """HF [heads*head_dim, hidden] <-> ours [hidden, heads, head_dim]."""
  fwd = lambda w: w.T.reshape(w.shape[1], heads, head_dim)
  inv = lambda p: p.reshape(p.shape[0], heads * head_dim).T
  return fwd, inv


def _bias_to_heads(heads: int, head_dim: int) -> tuple[Callable, Callable]:
  return (lambda b: b.reshape(heads, head_dim)), (lambda p: p.reshape(heads * head_dim))


def _transpose() -> tuple[Callable, Callable]:
  return (lambda w: w.T), (lambda p: p.T)


def mapping_table(cfg: ModelConfig) -> list[TensorMapping]:
  """Every tensor of `cfg`'s checkpoint, in HF naming, with its param path and layout transforms."""
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  layer = "model.layers.{i}."
  attn = ("layers", "attn")

  def m(hf, path, fns=(_identity, _identity)):
    return TensorMapping(hf, path, *fns)

  table = [
      m("model.embed_tokens.weight", ("embedding",)),
      m("model.norm.weight", ("final_norm", "scale")),
      m(layer + "input_layernorm.weight", ("layers", "input_norm", "scale")),
      m(layer + "post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale")),
      m(layer + "self_attn.q_proj.weight", attn + ("q_kernel",), _linear_to_heads(n, h)),
      m(layer + "self_attn.k_proj.weight", attn + ("k_kernel",), _linear_to_heads(k, h)),
      m(layer + "self_attn.v_proj.weight", attn + ("v_kernel",), _linear_to_heads(k, h)),
      m(layer + "self_attn.o_proj.weight", attn + ("o_kernel",),
        ((lambda w: w.T.reshape(n, h, w.shape[0])), (lambda p: p.reshape(n * h, p.shape[-1]).T))),
      m(layer + "mlp.gate_proj.weight", ("layers", "mlp", "gate_kernel"), _transpose()),
      m(layer + "mlp.up_proj.weight", ("layers", "mlp", "up_kernel"), _transpose()),
      m(layer + "mlp.down_proj.weight", ("layers", "mlp", "down_kernel"), _transpose()),
  ]
  if cfg.attention_bias:
    table += [
        m(layer + "self_attn.q_proj.bias", attn + ("q_bias",), _bias_to_heads(n, h)),
        m(layer + "self_attn.k_proj.bias", attn + ("k_bias",), _bias_to_heads(k, h)),
        m(layer + "self_attn.v_proj.bias", attn + ("v_bias",), _bias_to_heads(k, h)),
    ]
  if cfg.o_proj_bias:
    table.append(m(layer + "self_attn.o_proj.bias", attn + ("o_bias",)))
  if cfg.qk_norm:
    table += [
        m(layer + "self_attn.q_norm.weight", attn + ("q_norm", "scale")),
        m(layer + "self_attn.k_norm.weight", attn + ("k_norm", "scale")),
    ]
  if not cfg.tie_embeddings:
    table.append(m("lm_head.weight", ("lm_head",), _transpose()))
  return table


def _hf_names(entry: TensorMapping, cfg: ModelConfig) -> list[str]:
  if entry.per_layer:
    return [entry.hf_name.format(i=i) for i in range(cfg.num_layers)]
  return [entry.hf_name]


def _tensor_files(hf_dir: str) -> dict[str, str]:
  """HF tensor name -> the safetensors file holding it."""
  index = os.path.join(hf_dir, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    missing = sorted({v for v in weight_map.values() if not os.path.exists(os.path.join(hf_dir, v))})
    if missing:
      raise FileNotFoundError(f"{index} lists shard(s) that are not in {hf_dir}: {', '.join(missing)}")
    return {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
  single = os.path.join(hf_dir, SINGLE_FILE)
  if not os.path.exists(single):
    raise FileNotFoundError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
  return {name: single for name in _open(single).keys()}


def _open(path: str):
  try:
    return safe_open(path, framework="np")
  except Exception as e:  # safetensors raises its own error types for corrupt headers.
    raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-download or re-export it") from None


class _TensorReader:
  """Opens each shard once and reads tensors by name."""

  def __init__(self, files: dict[str, str]):
    self._files = files
    self._handles: dict[str, Any] = {}

  def read(self, name: str) -> np.ndarray:
    path = self._files[name]
    if path not in self._handles:
      self._handles[path] = _open(path)
    try:
      return self._handles[path].get_tensor(name)
    except Exception as e:
      raise CheckpointError(f"{path}: tensor {name!r} could not be read ({e}); the file is truncated or corrupt") from None


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get_path(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _expected_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(cfg)))[0]
  return {tuple(p.key for p in path): leaf.shape for path, leaf in flat}


def load_hf(hf_dir: str, dtype: Any = np.float32, shardings: Any = None, progress: bool = False,
            config_overrides: dict[str, Any] | None = None) -> tuple[ModelConfig, dict[str, Any]]:
  """Loads `hf_dir` (config.json + single or sharded safetensors) into (ModelConfig, params).

  Args:
    hf_dir: a Hugging Face model directory.
    dtype: the params' dtype (the stored bf16 / f16 / f32 is cast to it); sets `cfg.param_dtype`.
    shardings: optional tree of `jax.sharding.Sharding` matching the params; each param is placed onto
      its sharding as soon as it is assembled, so host memory holds about one stacked param at a time.
    progress: show a progress bar over tensors.
    config_overrides: ModelConfig fields to set, e.g. {"dtype": "bfloat16"} for bf16 compute.
  """
  dtype = jnp.dtype(dtype)
  try:
    cfg = ModelConfig.from_hf_dir(hf_dir, **{"param_dtype": str(dtype), **(config_overrides or {})})
  except ConfigError as e:  # the model directory, not the run's config, is at fault
    raise CheckpointError(str(e)) from None
  files = _tensor_files(hf_dir)
  table = mapping_table(cfg)
  wanted = {name for entry in table for name in _hf_names(entry, cfg)}
  if cfg.tie_embeddings:
    wanted.add("lm_head.weight")  # tied checkpoints may store a copy; it is not needed.
  unexpected = sorted(n for n in files if n not in wanted and "rotary_emb" not in n)
  if unexpected:
    raise CheckpointError(f"{hf_dir}: unexpected tensor(s) for model_type {cfg.model_type!r}: "
                          f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
  shapes = _expected_shapes(cfg)
  reader = _TensorReader(files)
  params: dict[str, Any] = {}
  entries = table
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    entries = tqdm(table, desc=f"loading {os.path.basename(hf_dir.rstrip('/'))}", unit="param")
  for entry in entries:
    shape = shapes[entry.path]
    layer_shape = shape[1:] if entry.per_layer else shape
    hf_shape = jax.eval_shape(entry.to_hf, jax.ShapeDtypeStruct(layer_shape, dtype)).shape
    value = np.empty(shape, dtype)
    for i, name in enumerate(_hf_names(entry, cfg)):
      if name not in files:
        raise CheckpointError(f"{hf_dir}: tensor {name!r} is missing (needed for {'/'.join(entry.path)})")
      raw = reader.read(name)
      if raw.shape != hf_shape:
        raise CheckpointError(f"{hf_dir}: tensor {name!r} has shape {raw.shape}; config.json implies "
                              f"{hf_shape} (for {'/'.join(entry.path)})")
      converted = entry.to_param(raw)
      if entry.per_layer:
        value[i] = converted
      else:
        value[...] = converted
    _set_path(params, entry.path, _place(value, _get_path(shardings, entry.path) if shardings else None))
  return cfg, params


def _place(value: np.ndarray, sharding: Any) -> jax.Array:
  if sharding is None:
    return jax.device_put(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def iter_hf_tensors(cfg: ModelConfig, params: dict[str, Any], dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) for every tensor of the checkpoint, converted from params in table order."""
  for entry in mapping_table(cfg):
    value = np.asarray(jax.device_get(_get_path(params, entry.path)))
    for i, name in enumerate(_hf_names(entry, cfg)):
      per_layer = value[i] if entry.per_layer else value
      yield name, np.ascontiguousarray(entry.to_hf(per_layer).astype(dtype))


def _parse_size(size: int | str) -> int:
  if isinstance(size, int):
    return size
  units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
  text = size.strip().upper()
  for unit, factor in units.items():
    if text.endswith(unit):
      return int(float(text[: -len(unit)]) * factor)
  return int(text)


def _plan_shards(cfg: ModelConfig, itemsize: int, limit: int) -> list[list[str]]:
  """Tensor names grouped into shards of at most `limit` bytes (a larger tensor gets its own shard)."""
  shapes = _expected_shapes(cfg)
  shards: list[list[str]] = [[]]
  size = 0
  for entry in mapping_table(cfg):
    nbytes = int(np.prod(shapes[entry.path][1 if entry.per_layer else 0:])) * itemsize
    for name in _hf_names(entry, cfg):
      if size and size + nbytes > limit:
        shards.append([])
        size = 0
      shards[-1].append(name)
      size += nbytes
  return shards


def _with_qwen2_biases(cfg: ModelConfig, params: dict[str, Any]) -> tuple[ModelConfig, dict[str, Any]]:
  """transformers' Qwen2 always has q/k/v biases; a bias-free qwen2 model is exported with zero biases."""
  if cfg.model_type != "qwen2" or cfg.attention_bias:
    return cfg, params
  layers, n, k, h = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  zeros = lambda heads: np.zeros((layers, heads, h), np.float32)
  attn = {**params["layers"]["attn"], "q_bias": zeros(n), "k_bias": zeros(k), "v_bias": zeros(k)}
  return cfg.replace(attention_bias=True), {**params, "layers": {**params["layers"], "attn": attn}}


def save_hf(cfg: ModelConfig, params: dict[str, Any], out_dir: str, max_shard_size: int | str = "5GB",
            dtype: Any = None, tokenizer: Any = None) -> list[str]:
  """Writes config.json and (sharded) safetensors that `transformers` loads, and with `tokenizer` (a
  `cftjax.tokenizer.Tokenizer`) its files and a generation_config.json (`Tokenizer.save`); returns
  the model files written.

  dtype defaults to `cfg.param_dtype`. Each shard is written as soon as it is full, so host memory
  stays near one shard.
  """
  os.makedirs(out_dir, exist_ok=True)
  dtype = jnp.dtype(dtype or cfg.param_dtype)
  cfg, params = _with_qwen2_biases(cfg, params)
  plan = _plan_shards(cfg, dtype.itemsize, _parse_size(max_shard_size))
  files = ([SINGLE_FILE] if len(plan) == 1 else
           [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
  shard_of = {name: i for i, names in enumerate(plan) for name in names}
  pending: dict[str, np.ndarray] = {}
  total = 0
  for name, array in iter_hf_tensors(cfg, params, dtype):
    pending[name] = array
    total += array.nbytes
    shard = shard_of[name]
    if len(pending) == len(plan[shard]):
      save_file(pending, os.path.join(out_dir, files[shard]), metadata={"format": "pt"})
      pending = {}
  written = list(files)
  if len(files) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": {n: files[i] for n, i in shard_of.items()}}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
    written.append(INDEX_FILE)
  hf_config = cfg.to_hf_dict()
  hf_config["torch_dtype"] = str(dtype)
  with open(os.path.join(out_dir, HF_CONFIG_FILE), "w") as f:
    json.dump(hf_config, f, indent=2)
  written.append(HF_CONFIG_FILE)
  if tokenizer is not None:
    tokenizer.save(out_dir)
  log.info("wrote %d tensors (%.1f MB) in %d file(s) to %s", len(shard_of), total / 1e6, len(files), out_dir)
  return written
