"""Models on disk in cftjax's own formats, and building a model from a config's `model` section.

A converted-model checkpoint DIR (`cftjax convert`): `params/` (Orbax), `model_config.json`
(ModelConfig fields), `tokenizer/` (optional). A training run directory RUN_DIR (`cftjax train`):
`config.json` (the run's config), `checkpoints/<step>/state` (the train state, its params included)
and `best/<step>/params`; `load_run` reads the params a checkpoint selector (`RUN_DIR`,
`RUN_DIR:best`, `RUN_DIR:latest`, `RUN_DIR:step=N`) picks.
"""

from __future__ import annotations

import dataclasses
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
from cftjax.models import lora
from cftjax.models.decoder import abstract_params, init_params
from cftjax.tokenizer import NAMED_TEMPLATE_DIR, Tokenizer

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "generation_config.json",
                   "vocab.json", "vocab.txt", "merges.txt")
RUN_CHECKPOINT_DIR = "checkpoints"  # RUN_DIR/checkpoints/<step>/{state,data,config}
RUN_BEST_DIR = "best"  # RUN_DIR/best/<step>/params

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
  """model_cfg with a config `model` section's compute settings: dtype, remat, attention and the
  LoRA adapters (model.lora)."""
  adapters = model.get("lora") or {}  # run configs written before model.lora existed: no adapters
  try:  # run configs written before model.attention existed read as "auto"
    return model_cfg.replace(
        dtype=model.dtype, remat=model.remat, attention=model.get("attention", "auto"),
        lora_rank=adapters.get("rank", 0), lora_alpha=adapters.get("alpha", 16.0),
        lora_dropout=adapters.get("dropout", 0.0), lora_targets=tuple(adapters.get("targets", ModelConfig.lora_targets)),
        quantize_base=adapters.get("quantize_base", "none"),
        lora_modules_to_save=tuple(adapters.get("modules_to_save", ())))
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


def fresh_base_params(base_cfg: ModelConfig, seed: int, shardings: Any = None) -> Any:
  """The params a run of train.seed that starts from no checkpoint draws (`state.create_train_state`
  initialises them from the first key of PRNGKey(seed) split in two), on `shardings` if given: the
  base of a LoRA run without model.init_from."""
  params_rng = jax.random.split(jax.random.PRNGKey(seed))[0]
  return jax.jit(lambda r: init_params(base_cfg, r), out_shardings=shardings)(params_rng)


def lora_base_params(config: Any, base_cfg: ModelConfig, shardings: Any = None) -> Any:
  """The plain float params a LoRA run of `config` adapts (base_cfg: its model without adapters), on
  `shardings` (default: the first device): model.init_from_run's params (as `load_run` selects them;
  merged when that run trained adapters), else model.init_from's, else `fresh_base_params` of train.seed."""
  init_run = config.model.get("init_from_run")
  if init_run:
    _, params, _ = load_run(init_run)
    return jax.device_put(params, shardings) if shardings is not None else params
  if config.model.init_from:
    return load_init_params(config.model.init_from, shardings)
  return fresh_base_params(base_cfg, config.train.seed, shardings)


# ------------------------------------------------------------------------------------------------
# Training run directories and the checkpoint selector.

SELECTOR_HELP = "RUN_DIR, RUN_DIR:best, RUN_DIR:latest or RUN_DIR:step=N"


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
  """Where a checkpoint is read from: `path` (a run directory or a converted model checkpoint) and,
  for a run directory, which of its params: "auto" (best if it beats step 0, else latest), "best",
  "latest" or "step" (then `step`)."""

  path: str
  select: str = "auto"
  step: int | None = None

  def __str__(self) -> str:
    suffix = {"auto": "", "best": ":best", "latest": ":latest"}.get(self.select, f":step={self.step}")
    return self.path + suffix


def parse_checkpoint_ref(spec: str) -> CheckpointRef:
  """The one parser of checkpoint arguments (--ckpt, model.init_from_run): `PATH`, `PATH:best`,
  `PATH:latest` or `PATH:step=N`. A path that exists as written is taken whole (even with a colon)."""
  spec = str(spec)
  if os.path.exists(spec) or ":" not in spec:
    return CheckpointRef(spec)
  path, selector = spec.rsplit(":", 1)
  if selector in ("best", "latest"):
    return CheckpointRef(path, selector)
  if selector.startswith("step="):
    number = selector[len("step="):]
    if number.isdigit():
      return CheckpointRef(path, "step", int(number))
  raise ValueError(f"{spec!r}: unknown checkpoint selector {selector!r}; use {SELECTOR_HELP}")


def is_run_dir(path: str) -> bool:
  """Whether `path` is a `cftjax train` run directory (not a converted model checkpoint)."""
  return (os.path.exists(os.path.join(path, RUN_CONFIG_FILE))
          and not os.path.exists(os.path.join(path, CONFIG_FILE)))


def read_run_config(run_dir: str) -> config_dict.ConfigDict:
  """The config a `cftjax train` run directory was written with (RUN_DIR/config.json)."""
  path = os.path.join(run_dir, RUN_CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {run_dir!r} is not a directory written by `cftjax train` "
                            "(it writes config.json with its first checkpoint)")
  with open(path, encoding="utf-8") as f:
    return config_dict.ConfigDict(json.load(f)["config"])


def finalized_steps(directory: str) -> list[int]:
  """The finalized steps of an Orbax manager directory (RUN_DIR/checkpoints or RUN_DIR/best), sorted."""
  return sorted(ocp.utils.checkpoint_steps(directory)) if os.path.isdir(directory) else []


def run_steps(run_dir: str) -> tuple[list[int], int | None]:
  """(finalized train-state steps, the best-params step or None) of a run directory."""
  best = finalized_steps(os.path.join(run_dir, RUN_BEST_DIR))
  return finalized_steps(os.path.join(run_dir, RUN_CHECKPOINT_DIR)), (best[-1] if best else None)


def _what_exists(run_dir: str, steps: list[int], best: int | None) -> str:
  have = f"saved steps {steps}" if steps else "no saved step"
  return have + (f", best: step {best}" if best is not None else ", no best/")


def _no_best_reason(run_dir: str) -> str:
  try:
    metric = read_run_config(run_dir).checkpoint.get("best_metric", "")
  except (FileNotFoundError, KeyError, ValueError):
    metric = ""
  if not metric:
    return "it was trained without checkpoint.best_metric"
  return f"no eval has saved one yet (checkpoint.best_metric={metric!r})"


def select_run_step(ref: CheckpointRef) -> tuple[str, int, str]:
  """(Orbax manager directory, step, item name) holding the params `ref` selects in its run directory.

  "auto" is best/ when its step is after step 0 (a trained model beat the untrained one), else the
  latest saved step; it logs which. Errors name the run directory and the steps that exist.
  """
  run_dir = ref.path
  steps, best = run_steps(run_dir)
  state_dir = os.path.abspath(os.path.join(run_dir, RUN_CHECKPOINT_DIR))
  best_dir = os.path.abspath(os.path.join(run_dir, RUN_BEST_DIR))
  exists = _what_exists(run_dir, steps, best)
  if ref.select == "auto":
    if best is not None and (best > 0 or not steps or steps[-1] == 0):
      log.info("%s: using best/ (step %d); pick another with %s:latest or :step=N", run_dir, best, run_dir)
      return best_dir, best, "params"
    if steps:
      why = ("best/ is step 0, the untrained model no later eval beat" if best is not None
             else "the run has no best/")
      log.info("%s: using the latest step %d (%s); pick another with %s:best or :step=N", run_dir,
               steps[-1], why, run_dir)
      return state_dir, steps[-1], "state"
    raise FileNotFoundError(f"{run_dir}: no checkpoint to read ({exists}); train it first")
  if ref.select == "best":
    if best is None:
      raise FileNotFoundError(f"{ref}: the run has no best/ checkpoint: {_no_best_reason(run_dir)} "
                              f"({exists}); use {run_dir}:latest or {run_dir}:step=N")
    return best_dir, best, "params"
  if ref.select == "latest":
    if not steps:
      raise FileNotFoundError(f"{ref}: the run has no saved step yet ({exists})")
    return state_dir, steps[-1], "state"
  if ref.step in steps:
    return state_dir, ref.step, "state"
  if ref.step == best:
    return best_dir, best, "params"
  raise FileNotFoundError(f"{ref}: no step {ref.step} in {run_dir} ({exists})")


def load_run_params(ref: CheckpointRef | str, target: Any) -> tuple[int, Any]:
  """(step number, params) that `ref` (a CheckpointRef or its string) selects in a run directory,
  restored like `target` (ShapeDtypeStructs with shardings, e.g. `params_target(cfg, dtype="float32")`:
  run checkpoints hold float32 master params). From a train-state checkpoint only the params are read."""
  ref = ref if isinstance(ref, CheckpointRef) else parse_checkpoint_ref(ref)
  directory, number, item = select_run_step(ref)
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


def load_run_adapters(ref: CheckpointRef | str) -> tuple[ModelConfig, Any, Tokenizer]:
  """(model config with its adapters, adapters (float32, first device), tokenizer) that `ref` selects
  in a run that trained LoRA adapters (model.lora.rank > 0)."""
  ref = ref if isinstance(ref, CheckpointRef) else parse_checkpoint_ref(ref)
  model_cfg, tokenizer = build_model(read_run_config(ref.path).model)
  if not model_cfg.lora_rank:
    raise ConfigError(f"{ref.path} trained the whole model (model.lora.rank=0): it has no adapters to "
                      "export; drop --adapters-only to export its weights")
  number, adapters = load_run_params(
      ref, lora.split(params_target(model_cfg, dtype="float32"), model_cfg.lora_modules_to_save)[1])
  log.info("%s: loaded the adapters of step %d", ref, number)
  return model_cfg, adapters, tokenizer


def load_run(ref: CheckpointRef | str, dtype: str | None = None) -> tuple[ModelConfig, Any, Tokenizer]:
  """(model config, params on the first device, tokenizer) of the params `ref` selects in a `cftjax
  train` run directory, built from the run's own config; `dtype` overrides its compute dtype. The
  params of a run that trained LoRA adapters are its base with the adapters merged in (`lora.merge`),
  under its model config without adapters."""
  ref = ref if isinstance(ref, CheckpointRef) else parse_checkpoint_ref(ref)
  config = read_run_config(ref.path)
  model_cfg, tokenizer = build_model(config.model)
  if model_cfg.lora_rank:
    _, adapters, _ = load_run_adapters(ref)
    base = lora.quantize_base(model_cfg, lora_base_params(config, model_cfg.without_lora()))
    model_cfg, params = model_cfg.without_lora(), lora.merge(model_cfg, lora.combine(base, adapters))
  else:
    number, params = load_run_params(ref, params_target(model_cfg, dtype="float32"))  # master params
    log.info("%s: loaded the params of step %d", ref, number)
  return model_cfg.replace(**({"dtype": dtype} if dtype else {})), params, tokenizer


def load_model(spec: str, *, dtype: str | None = None,
               tokenizer_dir: str | None = None) -> tuple[ModelConfig, Any, Tokenizer]:
  """(model config, params, tokenizer) of a converted model checkpoint (model_config.json) or of the
  params a checkpoint selector picks in a training run directory (config.json): `RUN_DIR`,
  `RUN_DIR:best`, `RUN_DIR:latest` or `RUN_DIR:step=N` (`parse_checkpoint_ref`).

  dtype overrides the compute dtype. The checkpoint's own tokenizer wins; tokenizer_dir is the
  fallback for a checkpoint without one.
  """
  ref = parse_checkpoint_ref(spec)
  path = ref.path
  if os.path.exists(os.path.join(path, CONFIG_FILE)):
    if ref.select != "auto":
      raise ValueError(f"{spec}: {path} is a converted model checkpoint with one set of params; "
                       f"a selector (:best, :latest, :step=N) applies to a training run directory")
    overrides = {"dtype": dtype} if dtype else None
    model_cfg, params, own_tokenizer = load_model_checkpoint(path, config_overrides=overrides)
    if not (own_tokenizer or tokenizer_dir):
      raise ValueError(f"{path} holds no tokenizer/; set --config.tokenizer_dir")
    tokenizer = Tokenizer.from_dir(own_tokenizer or tokenizer_dir)
  elif os.path.exists(os.path.join(path, RUN_CONFIG_FILE)):
    model_cfg, params, tokenizer = load_run(ref, dtype)
  else:
    raise FileNotFoundError(f"{path}: neither a model checkpoint ({CONFIG_FILE}) nor a training run "
                            f"directory ({RUN_CONFIG_FILE})")
  tokenizer.check_fits_model(model_cfg.vocab_size)
  return model_cfg, params, tokenizer
