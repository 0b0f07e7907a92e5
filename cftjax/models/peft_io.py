"""LoRA adapters <-> a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`),
the format `peft.PeftModel.from_pretrained` loads onto the Hugging Face base model.

PEFT stores per layer and projection lora_A.weight [rank, in_features] and lora_B.weight
[out_features, rank] under "base_model.model.model.layers.{i}.<module>"; cftjax's adapters are A
[layers, in..., rank] and B [layers, rank, out...] (`cftjax.models.lora`), the in / out axes
flattened in the same order as the HF projection's features. Both scale by lora_alpha / r. A module
trained whole (`modules_to_save`: "embed_tokens", "lm_head") is stored as PEFT stores it, under its
HF weight's name ("base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"),
[vocab, hidden] (cftjax's embedding is [vocab, hidden] too, its lm_head [hidden, vocab]).
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from cftjax.models import lora
from cftjax.models.checkpoint_io import CheckpointError
from cftjax.models.config import ModelConfig
from cftjax.models.decoder import abstract_params

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model.model.layers.{i}."
# A modules_to_save copy: (its tensor's name, whether cftjax's param is the transpose of HF's weight).
_SAVED_MODULES = {"embed_tokens": ("base_model.model.model.embed_tokens.weight", False),
                  "lm_head": ("base_model.model.lm_head.weight", True)}


def _tensor_names(target: str, layer: int) -> tuple[str, str]:
  module = _PREFIX.format(i=layer) + lora.TARGETS[target].hf_module
  return module + ".lora_A.weight", module + ".lora_B.weight"


def save_adapters(cfg: ModelConfig, adapters: dict[str, Any], out_dir: str,
                  base_model: str | None = None) -> list[str]:
  """Writes a PEFT LoRA adapter directory for `adapters` (`lora.split(params, cfg.lora_modules_to_save)
  [1]` of a model of cfg: the adapters and trained module copies);
  base_model: what adapter_config.json names as base_model_name_or_path. Returns the files written."""
  os.makedirs(out_dir, exist_ok=True)
  tensors = {}
  for group in adapters["layers"].values():
    for key, adapter in group.items():
      target = key[:-len(lora.ADAPTER_SUFFIX)]
      a, b = (np.asarray(jax.device_get(adapter[n]), np.float32) for n in ("a", "b"))
      for i in range(a.shape[0]):
        name_a, name_b = _tensor_names(target, i)
        tensors[name_a] = np.ascontiguousarray(a[i].reshape(-1, cfg.lora_rank).T)  # [rank, in]
        tensors[name_b] = np.ascontiguousarray(b[i].reshape(cfg.lora_rank, -1).T)  # [out, rank]
  for module in cfg.lora_modules_to_save:
    name, transposed = _SAVED_MODULES[module]
    weight = np.asarray(jax.device_get(adapters[lora.MODULES_TO_SAVE[module]]), np.float32)
    tensors[name] = np.ascontiguousarray(weight.T if transposed else weight)  # [vocab, hidden]
  save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
      "target_modules": sorted(lora.TARGETS[t].hf_module.split(".")[-1] for t in cfg.lora_targets),
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
      "modules_to_save": list(cfg.lora_modules_to_save) or None,
  }
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)
  return [WEIGHTS_FILE, CONFIG_FILE]


def _check_config(path: str, cfg: ModelConfig) -> None:
  """Raises naming the model.lora key that does not match the adapter's adapter_config.json."""
  where = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(where):
    raise FileNotFoundError(f"{where} not found: model.lora.init_from={path!r} is not a PEFT adapter directory")
  with open(where) as f:
    config = json.load(f)
  if config.get("peft_type", "LORA") != "LORA" or config.get("use_rslora") or config.get("use_dora"):
    raise CheckpointError(f"{where}: only plain LoRA adapters can be imported (peft_type LORA, no "
                          "rsLoRA or DoRA)")
  modules = sorted(lora.TARGETS[t].hf_module.split(".")[-1] for t in cfg.lora_targets)
  given = config.get("target_modules")
  expected = {"r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha}
  keys = {"r": "rank", "lora_alpha": "alpha"}
  for field, value in expected.items():
    if float(config.get(field, -1)) != float(value):
      raise CheckpointError(f"{where}: {field}={config.get(field)} but model.lora.{keys[field]}={value}; "
                            f"set --config.model.lora.{keys[field]}={config.get(field)}")
  if sorted(given or []) != modules:
    raise CheckpointError(f"{where}: target_modules={given} but model.lora.targets={cfg.lora_targets} "
                          f"(modules {modules}); set model.lora.targets to the adapter's")
  saved = tuple(config.get("modules_to_save") or ())
  if sorted(saved) != sorted(cfg.lora_modules_to_save):
    raise CheckpointError(f"{where}: modules_to_save={list(saved)} but model.lora.modules_to_save="
                          f"{cfg.lora_modules_to_save}; set model.lora.modules_to_save to the adapter's")


def load_adapters(path: str, cfg: ModelConfig, shardings: Any = None) -> dict[str, Any]:
  """The float32 adapters (and modules_to_save copies) of the PEFT adapter directory `path` for a
  model of cfg (its lora rank, alpha, targets and modules_to_save must match the adapter's), placed on
  `shardings` (a tree like the adapters) if given."""
  _check_config(path, cfg)
  weights = os.path.join(path, WEIGHTS_FILE)
  if not os.path.exists(weights):
    raise FileNotFoundError(f"{weights} not found: model.lora.init_from needs {WEIGHTS_FILE}")
  shapes = lora.split(nn.unbox(abstract_params(cfg)), cfg.lora_modules_to_save)[1]
  out: dict[str, Any] = {"layers": {}}
  with safe_open(weights, framework="np") as f:
    names = set(f.keys())

    def tensor(name: str, want: tuple[int, ...]) -> np.ndarray:
      if name not in names:
        raise CheckpointError(f"{weights}: tensor {name!r} is missing")
      if tuple(f.get_slice(name).get_shape()) != want:
        raise CheckpointError(f"{weights}: tensor {name!r} has shape "
                              f"{tuple(f.get_slice(name).get_shape())}; the model expects {want}")
      return f.get_tensor(name)

    for module in cfg.lora_modules_to_save:
      name, transposed = _SAVED_MODULES[module]
      param = lora.MODULES_TO_SAVE[module]
      shape = shapes[param].shape
      weight = tensor(name, shape[::-1] if transposed else shape)
      out[param] = (weight.T if transposed else weight).astype(np.float32)
    for group_name, group in shapes["layers"].items():
      out["layers"][group_name] = {}
      for key, shape in group.items():
        target = key[:-len(lora.ADAPTER_SUFFIX)]
        a_shape, b_shape = shape["a"].shape, shape["b"].shape
        a, b = np.empty(a_shape, np.float32), np.empty(b_shape, np.float32)
        for i in range(cfg.num_layers):
          name_a, name_b = _tensor_names(target, i)
          a[i] = tensor(name_a, (cfg.lora_rank, int(np.prod(a_shape[1:-1])))).T.reshape(a_shape[1:])
          b[i] = tensor(name_b, (int(np.prod(b_shape[2:])), cfg.lora_rank)).T.reshape(b_shape[1:])
        out["layers"][group_name][key] = {"a": a, "b": b}
  if shardings is not None:
    return jax.device_put(out, shardings)
  return out
