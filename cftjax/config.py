"""Experiment configs: the documented base config, config-file loading, `--config.a.b=v` overrides,
and the run-directory `config.json` (resolved config + code version) with its resume compatibility check."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

from ml_collections import config_dict

import cftjax

RUN_CONFIG_FILE = "config.json"
# Keys that fix the shapes of params, optimizer state or the data stream: a run dir written with
# other values cannot be resumed. A key ending in "." covers its whole section.
RESUME_INVARIANT_KEYS = (
    "model.init_from", "model.arch.", "model.param_dtype", "model.lora.rank", "model.lora.targets",
    "model.lora.quantize_base", "model.lora.modules_to_save",
    "data.train_path", "data.sources", "data.format", "data.template", "data.max_seq_len",
    "data.batch_size", "data.packing", "data.seed", "data.world.",
    "train.seed",
)


class ConfigError(ValueError):
  """A config (file, override, run-dir config.json or model config) that cannot be used as given;
  the message names the key and the fix."""


def base_config() -> config_dict.ConfigDict:
  """Every section and key the trainer reads, with defaults. Config files start from this."""
  c = config_dict.ConfigDict()

  # model: what is trained. Either a converted checkpoint (`cftjax convert` output) or a fresh model.
  c.model = config_dict.ConfigDict()
  c.model.init_from = config_dict.placeholder(str)  # converted checkpoint dir; None = from scratch
  c.model.tokenizer_dir = config_dict.placeholder(str)  # None = the tokenizer saved with init_from
  # Or start from a `cftjax train` run directory (and selector, e.g. RUN_DIR:latest; RUN_DIR alone =
  # its best params if they beat step 0, else its latest), taking its architecture and tokenizer: the
  # initial params of a full fine-tune (a GRPO policy), the frozen base of a LoRA run.
  c.model.init_from_run = ""
  # a CFT config trained into init_from_run first unless that run finished (a warm start); relative
  # to the directory of the config file that sets it (on the command line: to the working directory)
  c.model.warmstart_config = ""
  c.model.warmstart_steps = 0  # its train.steps (0 = the config's own)
  c.model.dtype = "float32"  # compute dtype ("bfloat16" on accelerators); master weights are float32
  c.model.param_dtype = "float32"  # dtype a fresh model's params are created in (training casts them to float32)
  c.model.remat = "none"  # activation checkpointing: none | minimal | full
  # attention and the other platform-specific kernels (cftjax.models.attention): auto (per platform:
  # cpu on CPU, blocked on GPU / TPU) | xla | blocked | cpu | cudnn (GPU flash; bf16, packing off)
  c.model.attention = "auto"
  # model.lora: low-rank adapters (cftjax.models.lora). rank 0 = full fine-tune; rank r > 0 trains only
  # the adapters (the optimizer holds no state for the frozen base) on `targets`, each projection
  # computing x W + (alpha / r) (x A) B with A random, B zero at the start.
  c.model.lora = config_dict.ConfigDict()
  c.model.lora.rank = 0
  c.model.lora.alpha = 16.0
  c.model.lora.dropout = 0.0  # dropout on the adapters' input while training
  c.model.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # any of these projections
  c.model.lora.quantize_base = "none"  # none | int8 | nf4 | int4: the frozen base's targeted kernels (QLoRA)
  # modules trained whole beside the adapters, starting from the base's (PEFT modules_to_save): any of
  # "embed_tokens", "lm_head", for a base that never read or wrote some tokens the fine-tune needs
  # (an untied head only)
  c.model.lora.modules_to_save = ()
  c.model.lora.init_from = config_dict.placeholder(str)  # a PEFT adapter dir to continue training
  # model.arch: the architecture of a from-scratch model (ignored with init_from).
  c.model.arch = config_dict.ConfigDict()
  c.model.arch.model_type = "qwen2"
  c.model.arch.vocab_size = config_dict.placeholder(int)  # None = the tokenizer's vocab size
  c.model.arch.hidden_size = 64
  c.model.arch.intermediate_size = 256
  c.model.arch.num_layers = 2
  c.model.arch.num_heads = 4
  c.model.arch.num_kv_heads = 2
  c.model.arch.head_dim = 16
  c.model.arch.rope_theta = 10000.0
  c.model.arch.rms_norm_eps = 1e-6
  c.model.arch.tie_embeddings = False
  c.model.arch.max_position_embeddings = 4096

  # data: the training rows (CFT examples or RL prompts) and held-out rows. The section itself is passed
  # to cftjax.data.pipeline, which reads how rows are rendered (template, max_seq_len, length_policy,
  # on_bad_row, packing, seed); the trainers pass which rows, batch size and epochs of each stream.
  c.data = config_dict.ConfigDict()
  c.data.train_path = ""  # training rows (JSONL / Parquet / ArrayRecord / TFDS dir); "," separates several
  c.data.sources = ()  # advanced: a tuple of source-spec dicts (path, weight, format, ...); overrides train_path
  c.data.eval_path = ""  # held-out rows for eval loss and verdict accuracy ("" = no eval)
  c.data.eval_split = ""  # split of a TFDS / HF datasets eval_path, e.g. "heldout" ("" = its only split)
  # template of the held-out rows (None = the training sources' template, which must then be one)
  c.data.eval_template = config_dict.FieldReference(None, field_type=object)
  c.data.format = "auto"  # row format of train_path / eval_path (auto-detected per row shape)
  # prompt template: a built-in name (cft, crl, math_cot, code) or a {system, user, assistant} dict
  c.data.template = config_dict.FieldReference("cft", field_type=object)
  c.data.max_seq_len = 2048  # tokens per row; longer examples follow length_policy
  c.data.length_policy = "drop"  # drop | truncate | error for over-long examples (drops are counted)
  c.data.on_bad_row = "error"  # error | skip unreadable rows (skips are counted)
  c.data.batch_size = 512  # GLOBAL rows per optimizer step, summed over all hosts
  c.data.packing = True  # pack several examples per row (segment ids restart positions)
  c.data.seed = 0  # shuffle seed
  c.data.num_epochs = 1  # passes over the data when train.steps = 0 (steps are then counted)
  c.data.num_workers = 0  # Grain worker processes rendering rows (0 = in-process)
  c.data.synthetic_world = False  # demo: write the synthetic critique world into world_dir if missing
  c.data.world_dir = ""  # where the synthetic world lives ("" = RUN_DIR/world)
  c.data.world = config_dict.ConfigDict()  # its size (cftjax.data.synthetic.write_world), seed data.seed
  c.data.world.num_train = 4000
  c.data.world.num_heldout = 500
  c.data.world.digits = 3  # operand digits of the world's additions
  c.data.world.teacher_leading_carry_slip = 0.0  # P(a critique forgets the leading column's carry)
  c.data.world.step_solutions = False  # also write the step critic demo's step-labelled rows
  c.data.world.step_slip_rate = 0.0  # P(each training step slips), independently; 0 = held-out's mix

  # optim: AdamW and the learning-rate schedule (cftjax.train.state.make_optimizer reads the section).
  c.optim = config_dict.ConfigDict()
  c.optim.lr = 5e-6  # peak learning rate
  c.optim.schedule = "cosine"  # cosine | linear | constant (after warmup)
  c.optim.warmup_steps = 0  # linear warmup length; or use warmup_ratio (set only one)
  c.optim.warmup_ratio = 0.1  # warmup as a fraction of the total steps
  c.optim.min_lr_ratio = 0.0  # final lr as a fraction of the peak
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0  # decoupled (AdamW); never on norms and biases
  c.optim.grad_clip_norm = 1.0  # global-norm clip (0 = off)
  c.optim.decay_embeddings = True  # weight-decay the embedding (and tied head) too

  # train: the step loop.
  c.train = config_dict.ConfigDict()
  c.train.objective = "cft"  # cft (cftjax.train.cft) | grpo (cftjax.train.grpo: rollouts, the rl section)
  c.train.run_dir = ""  # "" = runs/<config file name>
  c.train.seed = 0  # model init and step RNG
  c.train.steps = 0  # optimizer steps; 0 = data.num_epochs passes over the training rows
  c.train.micro_batches = 1  # gradient accumulation: global batch split into this many passes
  c.train.chunk_size = 4096  # cross-entropy chunk: about chunk_size x vocab logits per device at a time
  c.train.z_loss_weight = 0.0
  c.train.cpu_peak_flops = 0.0  # MFU denominator on CPU; 0 = measure a matmul at start-up
  # A step whose loss or gradients are NaN / inf skips its update (params and optimizer state
  # unchanged, counted in metrics as skipped_updates); this many in a row stop the run (0 = never).
  c.train.max_consecutive_nonfinite = 10

  # rl: GRPO / critique RL (train.objective = "grpo"): rollouts, rewards, the objective and the initial
  # policy. Prompts come from data.sources (each with a task: crl | math | code), data.batch_size per step.
  c.rl = config_dict.ConfigDict()
  # Sampling (cftjax.train.rollout.sample_groups reads the section). Prompts per step = data.batch_size.
  c.rl.group_size = 8  # completions per prompt (G); each prompt's group is its own baseline
  c.rl.max_new_tokens = 1024  # response length
  c.rl.temperature = 1.0
  c.rl.top_p = 1.0  # 1.0 = off
  c.rl.top_k = 0  # 0 = off
  c.rl.stop_strings = ()  # besides the tokenizer's end-of-turn ids
  c.rl.max_prompt_len = 1024  # longer prompts are dropped and counted
  c.rl.prompt_buckets = ()  # padded prompt lengths (() = powers of two >= 16)
  c.rl.seq_buckets = ()  # padded update-batch lengths (() = powers of two >= 16)
  c.rl.generation_batch_size = 0  # rows per generate call (0 = a whole prompt batch x G at once)
  c.rl.cache_dtype = "float32"  # KV cache dtype: float32 | bfloat16
  # Rewards (cftjax.rewards.registry.RewardComputer) and DAPO shaping.
  c.rl.rewards = config_dict.ConfigDict({
      "by_task": {"crl": "verdict", "math": "math", "code": "code"},
      "scale_by_source": {}, "options": {"verdict": {"style": "auto"}}})
  # The code reward (cftjax.rewards.registry.code_reward): model-written programs run in an OS
  # sandbox (docs/security.md; `cftjax doctor` shows what this machine gives).
  c.rl.code = config_dict.ConfigDict()
  # bwrap: bubblewrap namespaces + seccomp (refuses to start where unavailable); "none" runs the
  # programs as the trainer's user with rlimits only, accepting that risk explicitly.
  c.rl.code.isolation = "bwrap"
  c.rl.code.wall_s = 5.0  # per test run (cut to what is left of budget_s)
  c.rl.code.cpu_s = 5.0  # CPU seconds per test run
  c.rl.code.memory_mb = 512  # address space per process
  c.rl.code.disk_mb = 64  # the writable tmpfs
  c.rl.code.budget_s = 30.0  # wall time for all tests of one completion
  c.rl.code.all_or_nothing = False  # False: the test pass rate; True: 1 only if all pass (stops early)
  c.rl.code.num_workers = 4  # completions scored at once
  c.rl.code.parallel_tests = 2  # stdin/stdout tests of one completion run at once
  c.rl.overlong_buffer = 0  # DAPO soft overlong penalty over the last N tokens (0 = off)
  c.rl.overlong_penalty = 1.0  # its size at max_new_tokens
  c.rl.mask_truncated = False  # no loss on completions cut off at max_new_tokens
  c.rl.dynamic_sampling = False  # DAPO: drop groups with equal rewards, draw more prompts
  c.rl.max_draws = 3  # prompt batches drawn per step at most (dynamic sampling)
  # Objective (cftjax.train.grpo.grpo_sums reads the section; see cftjax.train.losses.grpo_loss).
  c.rl.loss = "grpo"  # grpo | dr_grpo (centred advantages, seq_mean_token_sum_norm) | gspo | gspo_token | cispo
  c.rl.advantage_scale = "group_std"  # group_std | batch_std | none (Dr. GRPO)
  c.rl.advantage_eps = 1e-6
  c.rl.eps_low = 0.2
  c.rl.eps_high = 0.28  # DAPO clip-higher
  c.rl.dual_clip = 0.0  # dual-clip constant c > 1 for A < 0 (0 = off)
  c.rl.aggregation = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
  c.rl.max_response_len = 0  # Dr. GRPO normaliser (0 = max_new_tokens)
  c.rl.kl_coef = 0.0  # KL to the frozen initial policy; 0 = no reference model is loaded
  c.rl.kl_kind = "k3"  # k1 | k3
  c.rl.entropy_coef = 0.0  # entropy bonus: loss -= entropy_coef * aggregated token entropy
  c.rl.tis_cap = 0.0  # truncated importance sampling min(pi_trainer / pi_sampler, C): C (0 = off;
  # needs recompute_old_logp; 2 in TRL / verl)
  c.rl.ppo_epochs = 1  # optimisation passes over each rollout batch
  c.rl.mini_batches = 1  # optimizer updates per pass (the batch split by rows)
  c.rl.recompute_old_logp = False  # old log-probs by a trainer forward pass instead of the sampler's
  # Critique-GRPO refinements (cftjax.train.refinement): each initial response is critiqued, the policy
  # refines it from a second prompt, and up to num_refinements refinements join the group as
  # off-policy responses to the ORIGINAL prompt (loss -p/(p + shaping_gamma) A on their tokens).
  c.rl.refinement = config_dict.ConfigDict()
  c.rl.refinement.when = "off"  # off | always | all_failed (only groups whose initial responses all fail)
  c.rl.refinement.critique = "simple_gt"  # simple | simple_gt (with the reference answer) | policy | critic
  c.rl.refinement.critic_run = ""  # critique = critic: a cftjax run dir (its best params), kept frozen
  c.rl.refinement.critique_template = "crl"  # prompt of model-written critiques (policy | critic)
  c.rl.refinement.verdict_style = "auto"  # parse_verdict style of model-written critiques
  c.rl.refinement.critique_max_new_tokens = 256
  # Refinement prompt: a template over question, solution (the previous response), critique.
  c.rl.refinement.template = config_dict.ConfigDict({
      "system": "", "user": ("{question}\n\nA previous answer:\n{solution}\n\nFeedback on it:\n{critique}"
                             "\n\nWrite a corrected answer to the question.")})
  c.rl.refinement.num_refinements = 1  # k: refinements added to a refined group (correct ones first)
  c.rl.refinement.correct_score = 1.0  # a response is correct when its task score >= this
  c.rl.refinement.shaping_gamma = 0.1  # gamma of the shaped ratio p / (p + gamma)

  # mesh: device mesh axis sizes (cftjax.parallel.make_mesh); -1 = all remaining devices.
  c.mesh = config_dict.ConfigDict()
  c.mesh.data = 1  # pure data parallelism (params replicated over it)
  c.mesh.fsdp = -1  # data parallelism with params / optimizer state sharded over it
  c.mesh.tensor = 1  # tensor (model) parallelism inside a layer
  # (logical axis, mesh axis | axes | None) pairs overriding cftjax.parallel.LOGICAL_RULES, e.g.
  # (("mlp", None),) keeps MLP weights whole on every device; () = the defaults.
  c.mesh.rules = ()

  # checkpoint: Orbax checkpoints under RUN_DIR/checkpoints (resumed automatically).
  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.every_steps = 500  # 0 = only at the end (and on SIGTERM)
  c.checkpoint.max_to_keep = 2
  c.checkpoint.async_save = True  # write in a background thread while training continues
  c.checkpoint.best_metric = ""  # eval metric whose best value is kept in RUN_DIR/best ("" = off)
  c.checkpoint.best_mode = "max"  # max | min

  # eval: periodic held-out evaluation on data.eval_path.
  c.eval = config_dict.ConfigDict()
  c.eval.every_steps = 0  # 0 = only before training and at the end
  c.eval.at_start = True  # evaluate the initial model (the "before" column)
  c.eval.loss_batches = 4  # held-out loss batches (0 = skip held-out loss)
  c.eval.verdict_examples = 64  # held-out rows critiqued greedily for verdict accuracy (0 = skip)
  c.eval.batch_size = 16  # prompts per generation batch
  c.eval.max_new_tokens = 256
  c.eval.verdict_style = "auto"  # parse_verdict style: auto | cft | crl | critique_rl
  c.eval.suite = ""  # an eval config file (configs/eval_*.py) also run at every eval ("" = none);
  # its metrics are logged as "<benchmark>/<metric>" and can be checkpoint.best_metric
  c.eval.suite_limit = 32  # examples per benchmark of that suite during training

  # logging: process 0 writes metrics.jsonl, TensorBoard events and a progress bar.
  c.logging = config_dict.ConfigDict()
  c.logging.every_steps = 10
  c.logging.tensorboard = True
  c.logging.progress_bar = True
  return c


# ------------------------------------------------------------------------------------------------
# Loading a config file and applying overrides.


def load_config_file(spec: str) -> config_dict.ConfigDict:
  """Imports `path.py` (or `path.py:arg`) and returns its `get_config()` (or `get_config(arg)`).

  While it runs, the file's directory is first on the import path, so a config file can import the
  modules beside it (the recipes in configs/recipes.py). An exception the file raises (a syntax
  error included) becomes a ConfigError naming the file and line. A relative `model.warmstart_config`
  the file sets is resolved against the file's directory (an override on the command line is
  relative to the working directory, as every other path).
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found; pass --config path/to/config.py")
  module_name = "cftjax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  config_dir = os.path.dirname(os.path.abspath(path))
  sys.path.insert(0, config_dir)  # config files import their siblings (configs/recipes.py)
  try:
    module_spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    config = None if get_config is None else get_config(arg) if arg else get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise _config_file_error(path, e) from e
  finally:
    sys.path.remove(config_dir)
  if get_config is None:
    raise ConfigError(f"{path}: defines no get_config() function")
  if not isinstance(config, config_dict.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected a ConfigDict")
  if "train" in config and not config.train.run_dir:  # eval configs have no train section
    config.train.run_dir = os.path.join("runs", module_name.removeprefix("cftjax_config_"))
  if "model" in config and config.model.get("warmstart_config"):
    config.model.warmstart_config = _beside(config_dir, config.model.warmstart_config)
  return config


def _config_file_error(path: str, error: Exception) -> ConfigError:
  """A config file's own exception (or syntax error) as one ConfigError naming the file and line:
  the innermost traceback line in the config file's directory (the file or a sibling it imports)."""
  if isinstance(error, SyntaxError) and error.filename:  # IndentationError too
    where, message = f"{error.filename} line {error.lineno}", error.msg
  else:
    config_dir = os.path.dirname(os.path.abspath(path))
    lines = [f for f in traceback.extract_tb(error.__traceback__)
             if os.path.dirname(os.path.abspath(f.filename)) == config_dir]
    where = f"{lines[-1].filename} line {lines[-1].lineno}" if lines else path
    message = str(error)
  return ConfigError(f"{where}: {type(error).__name__}: {message} (raised while loading the config "
                     "file; fix it there)")


def _beside(config_dir: str, spec: str) -> str:
  """A config-file spec (`path` or `path:arg`) with a relative path resolved against config_dir."""
  path, colon, arg = spec.partition(":")
  return os.path.normpath(os.path.join(config_dir, path)) + colon + arg


def leaf_paths(config: config_dict.ConfigDict, prefix: str = "") -> list[str]:
  """Dotted paths of every non-section key, e.g. "optim.lr"."""
  paths = []
  for key in config.keys():
    value = config[key]
    if isinstance(value, config_dict.ConfigDict):
      paths.extend(leaf_paths(value, f"{prefix}{key}."))
    else:
      paths.append(prefix + key)
  return paths


def _unknown_key_error(config: config_dict.ConfigDict, path: str) -> ConfigError:
  matches = difflib.get_close_matches(path, leaf_paths(config), n=3, cutoff=0.6)
  hint = f"; did you mean {' or '.join(repr('config.' + m) for m in matches)}?" if matches else ""
  return ConfigError(f"unknown config key 'config.{path}'{hint}")


def _parse_value(path: str, text: str, field_type: type, current: Any) -> Any:
  """Parses an override string the way absl/config_flags would for a field of `field_type`."""
  if text == "None" and current is None:
    return None
  try:
    if field_type is bool:
      lowered = text.lower()
      if lowered in ("true", "t", "1"):
        return True
      if lowered in ("false", "f", "0"):
        return False
      raise ValueError("expected true/false")
    if field_type is int:
      return int(text)
    if field_type is float:
      return float(text)
    if field_type is str:
      return text
    if field_type in (tuple, list, dict):
      value = ast.literal_eval(text)
      if isinstance(value, (tuple, list)) and field_type in (tuple, list):
        return field_type(value)
      if not isinstance(value, field_type):
        raise ValueError(f"expected a {field_type.__name__} literal")
      return value
  except (ValueError, SyntaxError) as e:
    raise ConfigError(f"--config.{path}={text}: cannot parse as {field_type.__name__} ({e})") from None
  try:  # a None-valued field with no declared type: any Python literal, else the string itself
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def set_override(config: config_dict.ConfigDict, path: str, text: str) -> None:
  """Sets `config.<path>` from its command-line text, checking the key exists and the type fits."""
  *sections, leaf = path.split(".")
  node = config
  for section in sections:
    if section not in node or not isinstance(node[section], config_dict.ConfigDict):
      raise _unknown_key_error(config, path)
    node = node[section]
  if leaf not in node:
    raise _unknown_key_error(config, path)
  if isinstance(node[leaf], config_dict.ConfigDict):
    raise ConfigError(f"--config.{path} names a section; override its keys, e.g. --config.{path}."
                      f"{next(iter(node[leaf].keys()), 'KEY')}=VALUE")
  value = _parse_value(path, text, node.get_type(leaf), node[leaf])
  try:
    with node.unlocked():
      node[leaf] = value
  except TypeError as e:
    raise ConfigError(f"--config.{path}={text}: {e}") from None


def split_override_args(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
  """Separates `--config.a.b=v` / `--config.a.b v` args from the rest: ([(path, text)], rest)."""
  overrides, rest = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--config."):
      name, eq, text = arg[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(args):
          raise ConfigError(f"{arg}: missing a value; write {arg}=VALUE")
        i += 1
        text = args[i]
      overrides.append((name, text))
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def load_config(spec: str, overrides: Iterable[tuple[str, str]] = ()) -> config_dict.ConfigDict:
  """Loads a config file, applies overrides in order and locks it against new keys."""
  config = load_config_file(spec)
  config.lock()
  for path, text in overrides:
    set_override(config, path, text)
  return config


# ------------------------------------------------------------------------------------------------
# The run directory's config.json.


def code_version() -> dict[str, Any]:
  """The package version and, when the package is in a git checkout, its commit and dirty flag."""
  version = {"cftjax": cftjax.__version__, "git_sha": None, "git_dirty": None}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(cftjax.__file__)))
  try:
    sha = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                         timeout=10)
    if sha.returncode == 0:
      version["git_sha"] = sha.stdout.strip()
      status = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                              capture_output=True, text=True, timeout=10)
      version["git_dirty"] = bool(status.stdout.strip())
  except (OSError, subprocess.TimeoutExpired):
    pass
  return version


def to_plain_dict(config: config_dict.ConfigDict) -> dict[str, Any]:
  """A JSON-compatible dict of the config (tuples become lists)."""
  return json.loads(config.to_json())


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def _is_resume_invariant(path: str) -> bool:
  return any(path == k or (k.endswith(".") and path.startswith(k)) for k in RESUME_INVARIANT_KEYS)


def check_resume_compatible(saved: dict[str, Any], config: config_dict.ConfigDict, where: str) -> None:
  """Raises if `config` changes a shape-fixing key relative to the config saved at `where` (a key the
  saved config lacks, written before the key existed, counts as its default)."""
  defaults = _flatten(to_plain_dict(base_config()))
  old, new = {**defaults, **_flatten(saved)}, _flatten(to_plain_dict(config))
  changed = [k for k in sorted(set(old) | set(new)) if _is_resume_invariant(k) and old.get(k) != new.get(k)]
  if changed:
    diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
    raise ConfigError(
        f"{where} was written by a different config ({diffs}). These keys fix param/optimizer/data "
        "shapes, so the run cannot resume: restore their values or use a new --config.train.run_dir.")


def check_run_config(run_dir: str, config: config_dict.ConfigDict) -> None:
  """Raises a ConfigError when RUN_DIR/config.json exists and `config` changes a key that fixes the
  shapes of its saved state (`check_resume_compatible`), or the file is unreadable."""
  path = os.path.join(run_dir, RUN_CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    try:
      saved = json.load(f)["config"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ConfigError(f"{path}: unreadable run config ({e}); move it aside to start afresh") from None
  check_resume_compatible(saved, config, path)


def write_run_config(run_dir: str, config: config_dict.ConfigDict, write: bool = True) -> None:
  """(When `write`: call on process 0 only) writes RUN_DIR/config.json with the resolved config and the
  code version, atomically."""
  if not write:
    return
  path = os.path.join(run_dir, RUN_CONFIG_FILE)
  os.makedirs(run_dir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"config": to_plain_dict(config), "code_version": code_version()}, f, indent=2,
              sort_keys=True)
  os.replace(tmp, path)
