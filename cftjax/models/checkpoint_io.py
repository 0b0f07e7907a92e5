"""Models on disk in cftjax's own formats, and building a model from a config's `model` section.

A converted-model checkpoint DIR (`cftjax convert`): `params/` (Orbax), `model_config.json`
(ModelConfig fields), `tokenizer/` (optional). A training run directory RUN_DIR (`cftjax train`):
`config.json` (the run's config), `checkpoints/<step>/state` (the train state, its params included)
and `best/<step>/params`; `load_run` reads the params of its best, latest or a given step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
from ml_collections import config_dict
import orbax.checkpoint as ocp

from cftjax import parallel
from cftjax.config import RUN_CONFIG_FILE, ConfigError
from cftjax.models.config import ModelConfig
from cftjax.models.decoder import abstract_params
from cftjax.tokenizer import NAMED_TEMPLATE_DIR, Tokenizer

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "generation_config.json",
                   "vocab.json", "vocab.txt", "merges.txt")
RUN_CHECKPOINT_DIR = "checkpoints"  # RUN_DIR/checkpoints/<step>/{state,data,config}
RUN_BEST_DIR = "best"  # RUN_DIR/best/<step>/params
RUN_STEPS = ("best", "latest")  # or a step number

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
  """A checkpoint or model file that exists but cannot be read into the model or run asked for."""


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
  """Copies whichever tokenizer, chat-template and generation-config files `src_dir` has
  (TOKENIZER_FILES and the NAMED_TEMPLATE_DIR folder); returns their names."""
  found = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, f))]
  if found:
    os.makedirs(dst_dir, exist_ok=True)
  for name in found:
    shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
  if os.path.isdir(os.path.join(src_dir, NAMED_TEMPLATE_DIR)):
    shutil.copytree(os.path.join(src_dir, NAMED_TEMPLATE_DIR), os.path.join(dst_dir, NAMED_TEMPLATE_DIR))
    found.append(NAMED_TEMPLATE_DIR)
  return found


def check_no_model_checkpoint(out_dir: str) -> None:
  """Raises FileExistsError if `out_dir` already holds a model checkpoint (params/ or its config)."""
  for name in (PARAMS_DIR, CONFIG_FILE):
    path = os.path.join(os.path.abspath(out_dir), name)
    if os.path.exists(path):
      raise FileExistsError(f"{path} already exists; choose an empty --out directory")


def save_model_checkpoint(out_dir: str, cfg: ModelConfig, params: dict[str, Any],
                          tokenizer_dir: str | None = None) -> None:
  """Writes params (Orbax, every process takes part), the model config and tokenizer files (process 0)."""
  out_dir = os.path.abspath(out_dir)
  check_no_model_checkpoint(out_dir)
  params_dir = os.path.join(out_dir, PARAMS_DIR)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(params_dir, params)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
      json.dump(cfg.to_json_dict(), f, indent=2)
    if tokenizer_dir:
      copy_tokenizer_files(tokenizer_dir, os.path.join(out_dir, TOKENIZER_DIR))


def read_model_config(ckpt_dir: str, **overrides) -> ModelConfig:
  path = os.path.join(ckpt_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {ckpt_dir} is not a cftjax model checkpoint "
                            "(make one with `cftjax convert --hf-dir DIR --out DIR`)")
  with open(path) as f:
    return ModelConfig(**{**json.load(f), **overrides})


def params_target(cfg: ModelConfig, shardings: Any = None, dtype: Any = None) -> Any:
  """A restore target: ShapeDtypeStructs of the plain params of `cfg` in `dtype` (default
  cfg.param_dtype) on `shardings` (a tree like the params; default: the first device)."""
  abstract = nn.unbox(abstract_params(cfg))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  return parallel.with_shardings(abstract, shardings, dtype)


def load_model_checkpoint(ckpt_dir: str, shardings: Any = None,
                          config_overrides: dict[str, Any] | None = None) -> tuple[ModelConfig, dict, str | None]:
  """Returns (cfg, params, tokenizer_dir or None); params restored straight onto `shardings` if given."""
  ckpt_dir = os.path.abspath(ckpt_dir)
  cfg = read_model_config(ckpt_dir, **(config_overrides or {}))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(ckpt_dir, PARAMS_DIR), params_target(cfg, shardings))
  tok = os.path.join(ckpt_dir, TOKENIZER_DIR)
  return cfg, params, tok if os.path.isdir(tok) else None


# ------------------------------------------------------------------------------------------------
# A model from a config's `model` section.


def _init_checkpoint_dir(path: str) -> str:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model.init_from={path!r} is not a directory; convert a Hugging Face "
                            "model with `cftjax convert` and point model.init_from at its output")
  return path


def with_run_settings(model_cfg: ModelConfig, model: Any) -> ModelConfig:
  """model_cfg with a config `model` section's compute settings: dtype, remat and attention."""
  try:  # run configs written before model.attention existed read as "auto"
    return model_cfg.replace(dtype=model.dtype, remat=model.remat, attention=model.get("attention", "auto"))
  except ConfigError as e:
    raise ConfigError(f"config.model: {e}") from None


def build_model(model: Any) -> tuple[ModelConfig, Tokenizer]:
  """(model config with the section's compute settings, tokenizer) of a config's `model` section:
  the converted checkpoint in model.init_from, or a fresh model of shape model.arch."""
  if model.init_from:
    model_cfg = read_model_config(_init_checkpoint_dir(model.init_from))
    tokenizer_dir = os.path.join(model.init_from, TOKENIZER_DIR)
    tokenizer_dir = model.tokenizer_dir or (tokenizer_dir if os.path.isdir(tokenizer_dir) else None)
    if not tokenizer_dir:
      raise ConfigError(f"model.init_from={model.init_from!r} holds no tokenizer/; set "
                        "--config.model.tokenizer_dir")
  else:
    if not model.tokenizer_dir:
      raise ConfigError("a model trained from scratch needs --config.model.tokenizer_dir "
                        "(or --config.model.init_from, a converted checkpoint)")
    tokenizer_dir = model.tokenizer_dir
  tokenizer = Tokenizer.from_dir(tokenizer_dir)
  if not model.init_from:
    arch = model.arch.to_dict()
    arch["vocab_size"] = arch["vocab_size"] or tokenizer.vocab_size
    model_cfg = ModelConfig(**arch, param_dtype=model.param_dtype)
  model_cfg = with_run_settings(model_cfg, model)
  tokenizer.check_fits_model(model_cfg.vocab_size)
  return model_cfg, tokenizer


def load_init_params(path: str, shardings: Any) -> Any:
  """The params of the converted model checkpoint in model.init_from, restored onto `shardings`."""
  return load_model_checkpoint(_init_checkpoint_dir(path), shardings=shardings)[1]


# ------------------------------------------------------------------------------------------------
# Training run directories.


def is_run_dir(path: str) -> bool:
  """Whether `path` is a `cftjax train` run directory (not a converted model checkpoint)."""
  return (os.path.exists(os.path.join(path, RUN_CONFIG_FILE))
          and not os.path.exists(os.path.join(path, CONFIG_FILE)))


def read_run_config(run_dir: str) -> config_dict.ConfigDict:
  """The config a `cftjax train` run directory was written with (RUN_DIR/config.json)."""
  path = os.path.join(run_dir, RUN_CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {run_dir!r} is not a directory written by `cftjax train`")
  with open(path, encoding="utf-8") as f:
    return config_dict.ConfigDict(json.load(f)["config"])


def _run_step_dir(run_dir: str, step: str | int) -> tuple[str, int, str]:
  """(Orbax manager directory, step number, item name) holding the params of `step` of a run."""
  if step == "best":
    directory, item = os.path.abspath(os.path.join(run_dir, RUN_BEST_DIR)), "params"
  else:
    directory, item = os.path.abspath(os.path.join(run_dir, RUN_CHECKPOINT_DIR)), "state"
  steps = ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []
  if step in ("best", "latest"):
    if not steps:
      hint = ("train with checkpoint.best_metric set, or load step 'latest'" if step == "best"
              else "the run has not saved a checkpoint yet")
      raise FileNotFoundError(f"{directory}: no finalized checkpoint for step {step!r}; {hint}")
    return directory, max(steps), item
  if not isinstance(step, int) and not str(step).isdigit():
    raise ValueError(f"step {step!r}: use 'best', 'latest' or a step number")
  if int(step) not in steps:
    raise FileNotFoundError(f"{directory}: no finalized step {int(step)}; saved steps: {sorted(steps)}")
  return directory, int(step), item


def load_run_params(run_dir: str, target: Any, step: str | int = "best") -> tuple[int, Any]:
  """(step number, params) of a run's best, latest or numbered step, restored like `target`
  (ShapeDtypeStructs with shardings, e.g. `params_target(cfg, dtype="float32")`: run checkpoints
  hold float32 master params). From a train-state checkpoint only the params are read."""
  directory, number, item = _run_step_dir(run_dir, step)
  if item == "params":
    manager = ocp.CheckpointManager(directory, item_handlers={"params": ocp.StandardCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    args = ocp.args.Composite(params=ocp.args.StandardRestore(target))
  else:
    manager = ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), target)
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
  try:
    restored = manager.restore(number, args=args)
  except ValueError as e:
    raise CheckpointError(f"{directory}/{number}: cannot read params for this model config ({e})") from e
  finally:
    manager.close()
  return number, restored.params if item == "params" else restored.state["params"]


def load_run(run_dir: str, step: str | int = "best", dtype: str | None = None
             ) -> tuple[ModelConfig, Any, Tokenizer]:
  """(model config, params on the first device, tokenizer) of a `cftjax train` run directory, built
  from the run's own config; `dtype` overrides its compute dtype."""
  config = read_run_config(run_dir)
  model_cfg, tokenizer = build_model(config.model)
  number, params = load_run_params(run_dir, params_target(model_cfg, dtype="float32"), step)  # master params
  log.info("%s: loaded the params of step %d (%s)", run_dir, number, step)
  return model_cfg.replace(**({"dtype": dtype} if dtype else {})), params, tokenizer


def load_model(path: str, *, step: str | int = "best", dtype: str | None = None,
               tokenizer_dir: str | None = None) -> tuple[ModelConfig, Any, Tokenizer]:
  """(model config, params, tokenizer) of a converted model checkpoint (model_config.json) or a
  training run directory (config.json; its `step`: best, latest or a number).

  dtype overrides the compute dtype. The checkpoint's own tokenizer wins; tokenizer_dir is the
  fallback for a checkpoint without one.
  """
  if os.path.exists(os.path.join(path, CONFIG_FILE)):
    overrides = {"dtype": dtype} if dtype else None
    model_cfg, params, own_tokenizer = load_model_checkpoint(path, config_overrides=overrides)
    if not (own_tokenizer or tokenizer_dir):
      raise ValueError(f"{path} holds no tokenizer/; set --config.tokenizer_dir")
    tokenizer = Tokenizer.from_dir(own_tokenizer or tokenizer_dir)
  elif os.path.exists(os.path.join(path, RUN_CONFIG_FILE)):
    model_cfg, params, tokenizer = load_run(path, step, dtype)
  else:
    raise FileNotFoundError(f"{path}: neither a model checkpoint ({CONFIG_FILE}) nor a training run "
                            f"directory ({RUN_CONFIG_FILE})")
  tokenizer.check_fits_model(model_cfg.vocab_size)
  return model_cfg, params, tokenizer
