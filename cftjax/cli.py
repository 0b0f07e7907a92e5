"""The `cftjax` command line: one subcommand per task (`cftjax train`, `cftjax plot`, ...).

A subcommand is a `Subcommand(name, help, add_arguments, run)` in SUBCOMMANDS; `run(args, overrides)`
returns the exit code. `--config.a.b=v` overrides are split off before argparse sees the rest. Bad
input ends in one line `cftjax: error: ...` and exit code 2 for an invalid command line or config
(ConfigError, as argparse's usage errors), else 1 (bad files or data, a failed run); `--debug`
re-raises. docs/troubleshooting.md lists the messages.
Ctrl-C exits 130 (`train` first saves a checkpoint and the summary).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence

import jax

from cftjax import aot
from cftjax import config as config_lib
from cftjax import host_memory
from cftjax import launch
from cftjax import sampling
from cftjax.data import preview, synthetic, tfds_builder
from cftjax.datagen import critique as critique_data
from cftjax.eval import runner
from cftjax.models import checkpoint_io, convert
from cftjax.models.config import REMAT_POLICIES
from cftjax.serve import server
from cftjax.rewards import sandbox
from cftjax.train import plots
from cftjax.train import run as run_lib


EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as a shell reports it; `train` saves first
CKPT_HELP = ("a model checkpoint (`cftjax convert` output) or a training run: RUN_DIR (its best params "
             "if they beat step 0, else its latest step), RUN_DIR:best, RUN_DIR:latest or RUN_DIR:step=N")


@dataclasses.dataclass(frozen=True)
class Subcommand:
  name: str
  help: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace, list[tuple[str, str]]], int]
  takes_config_overrides: bool = False


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]",
                      help="a config file defining get_config() (e.g. configs/demo_cft.py); then "
                           "override any key with --config.section.key=value")


def _run_train(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  summary = launch.train(config_lib.load_config(args.config, overrides))
  print(run_lib.format_summary(summary), flush=True)
  return EXIT_INTERRUPTED if summary["preempted"] and summary.get("signal") == "SIGINT" else 0


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
  _add_train_arguments(parser)
  parser.add_argument("--ckpt", required=True, help=CKPT_HELP)


def _run_eval(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  return runner.run_command(args, overrides)


def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--hf-dir", help="Hugging Face model dir (config.json, safetensors, tokenizer files)")
  parser.add_argument("--to-hf", action="store_true", help="export a cftjax checkpoint back to HF layout")
  parser.add_argument("--ckpt", help="with --to-hf: " + CKPT_HELP)
  parser.add_argument("--out", required=True, help="output directory (must not hold a checkpoint yet)")
  parser.add_argument("--dtype", default=None,
                      help="param dtype written (default: float32 on import, the checkpoint's on export)")
  parser.add_argument("--max-shard-size", default="5GB", help="with --to-hf: safetensors shard size")
  parser.add_argument("--adapters-only", action="store_true",
                      help="with --to-hf and a run that trained LoRA adapters: write only the adapters, as a "
                      "PEFT directory (adapter_config.json + adapter_model.safetensors); without it the "
                      "adapters are merged into the exported weights")


def _run_convert(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  del overrides
  if args.to_hf:
    if not args.ckpt:
      raise config_lib.ConfigError("--to-hf needs --ckpt DIR (a `cftjax convert` checkpoint or a training "
                                   "run dir)")
    convert.check_out_dir(args.out, to_hf=True)  # before the checkpoint is read
    if args.adapters_only:
      convert.export_adapters(args.ckpt, args.out)
    else:
      convert.export_hf(*checkpoint_io.load_model(args.ckpt), args.out, max_shard_size=args.max_shard_size,
                        dtype=args.dtype)
  else:
    if args.adapters_only:
      raise config_lib.ConfigError("--adapters-only goes with --to-hf --ckpt RUN_DIR (a run that trained "
                                   "LoRA adapters)")
    if not args.hf_dir:
      raise config_lib.ConfigError("give --hf-dir DIR (HF -> cftjax) or --to-hf --ckpt DIR (cftjax -> HF)")
    convert.hf_to_checkpoint(args.hf_dir, args.out, dtype=args.dtype or "float32")
  print(args.out)
  return 0


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--ckpt", required=True, help=CKPT_HELP)
  parser.add_argument("--prompt", required=True, action="append",
                      help="a user message (repeat for a batch); rendered with the chat template")
  parser.add_argument("--system", default=None, help="a system message put before every prompt")
  parser.add_argument("--raw", action="store_true",
                      help="encode each prompt as plain text, without the chat template (base models)")
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object per prompt: prompt, completion, num_tokens, stop_reason")
  parser.add_argument("--max-new-tokens", type=int, default=256)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--top-k", type=int, default=0)
  parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  parser.add_argument("--seed", type=int, default=0)


def _generation_prompts(args: argparse.Namespace, tokenizer) -> list[list[int]]:
  """Token ids of each --prompt: the chat template over [system?, user], or with --raw the plain
  text (with the tokenizer's bos when it adds one)."""
  if args.raw:
    if args.system is not None:
      raise ValueError("--system needs the chat template; drop --raw (or put the system text in --prompt)")
    return [tokenizer.encode(p, add_special_tokens=True) for p in args.prompt]
  system = [{"role": "system", "content": args.system}] if args.system is not None else []
  return [tokenizer.apply_chat_template(system + [{"role": "user", "content": p}], add_generation_prompt=True)
          for p in args.prompt]


def _run_generate(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  del overrides
  cfg, params, tokenizer = checkpoint_io.load_model(args.ckpt)
  prompts = _generation_prompts(args, tokenizer)
  _check_context_length(cfg.max_position_embeddings, max(map(len, prompts)), args.max_new_tokens)
  result = sampling.generate(params, cfg, prompts, rng=jax.random.key(args.seed),
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, stop_ids=tokenizer.eos_ids,
                             stop_strings=args.stop, tokenizer=tokenizer, pad_id=sampling.pad_id(tokenizer))
  for prompt, ids, tokens, length in zip(args.prompt, prompts, result.tokens, result.lengths):
    text = tokenizer.decode(tokens[:length].tolist(), skip_special_tokens=True)
    if args.json:
      stopped = length < args.max_new_tokens or (length and int(tokens[length - 1]) in tokenizer.eos_ids)
      print(json.dumps({"prompt": prompt, "prompt_tokens": len(ids), "completion": text,
                        "completion_ids": tokens[:length].tolist(), "num_tokens": int(length),
                        "stop_reason": "stop" if stopped else "length"}, ensure_ascii=False), flush=True)
    else:
      print(text, flush=True)
  return 0


def _check_context_length(max_positions: int, prompt_tokens: int, max_new_tokens: int) -> None:
  """Refuses (as vLLM's server does) a request that would run past the model's context length."""
  if prompt_tokens + max_new_tokens > max_positions:
    raise config_lib.ConfigError(
        f"--max-new-tokens={max_new_tokens}: the longest prompt ({prompt_tokens} tokens) plus "
        f"{max_new_tokens} new tokens exceeds the model's max_position_embeddings={max_positions}; "
        f"lower --max-new-tokens to at most {max(max_positions - prompt_tokens, 0)} or shorten the prompt")


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--ckpt", required=True, help="a model checkpoint or a training run dir (best params)")
  parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--served-model-name", default=None,
                      help="the model id clients must send (default: the checkpoint directory's name)")
  parser.add_argument("--max-batch", type=int, default=32, help="most requests generated as one batch")
  parser.add_argument("--batch-window-ms", type=float, default=5.0,
                      help="how long the first waiting request waits for others to join its batch")


def _run_serve(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  del overrides
  server.serve(args.ckpt, host=args.host, port=args.port, served_name=args.served_model_name,
               max_batch_rows=args.max_batch, batch_window_s=args.batch_window_ms / 1000)
  return 0


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
  actions = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
  build = actions.add_parser("build", help="rows -> a versioned TFDS dataset in ArrayRecord format")
  build.add_argument("--input", required=True, help="rows: JSONL / JSON / Parquet in any supported format")
  build.add_argument("--out", required=True, help="TFDS data dir; the dataset lands in OUT/NAME/VERSION")
  build.add_argument("--name", default="critique_rows")
  build.add_argument("--version", default="1.0.0")
  build.add_argument("--format", default="auto", help="row format (auto-detected by default)")
  build.add_argument("--heldout-fraction", type=float, default=0.0, help="also write a 'heldout' split")
  build.add_argument("--on-bad-row", default="error", choices=("error", "skip"),
                     help="skip (and count in the log) rows that do not parse, or stop at the first")
  build.add_argument("--overwrite", action="store_true", help="replace OUT/NAME/VERSION if it exists")
  critique_parser = actions.add_parser(
      "critique", help="candidates, labels, CRL and CFT rows from a verifiable set (resumable; configs/critique_data_demo.py)")
  critique_parser.add_argument("--config", required=True, help="a critique-data config (cftjax.datagen.critique.base_config)")
  critique_parser.add_argument("--out", required=True, help="output directory; rerun with the same one to resume")
  inspect = actions.add_parser("inspect", help="rendered, tokenized examples with the loss mask, length histogram")
  _add_train_arguments(inspect)
  inspect.add_argument("--num", type=int, default=3, help="examples to show")


def _run_data(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  if args.data_command == "build":
    splits = None
    if args.heldout_fraction:
      splits = {"train": 1.0 - args.heldout_fraction, "heldout": args.heldout_fraction}
    print(tfds_builder.build_dataset(args.input, args.out, name=args.name, version=args.version,
                                     fmt=args.format, splits=splits, on_bad_row=args.on_bad_row,
                                     overwrite=args.overwrite))
    return 0
  if args.data_command == "critique":
    return critique_data.run_command(args, overrides)
  config = config_lib.load_config(args.config, overrides)
  with synthetic.world_for_inspection(config) as config:  # writes nothing into the run
    _, tokenizer = checkpoint_io.build_model(config.model)
    print(preview.inspect_dataset(config.data, tokenizer, num_examples=args.num))
  return 0

def _add_compile_arguments(parser: argparse.ArgumentParser) -> None:
  _add_train_arguments(parser)
  parser.add_argument("--topology", required=True,
                      help="a TPU topology to compile for, e.g. v5p:2x2x2, v5e:4x4, v4:2x2x4 (multi-host "
                           "slices included); needs libtpu: pip install 'cftjax[tpu-compile]'")
  parser.add_argument("--objective", choices=aot.OBJECTIVES, default=None,
                      help="the program: the CFT step, the GRPO update or the rollout sampler "
                           "(default: config.train.objective)")
  parser.add_argument("--model-config", default=None, metavar="CONFIG_JSON",
                      help="a Hugging Face config.json giving the architecture (overrides the config's)")
  parser.add_argument("--sweep-remat", action="store_true",
                      help="compile every model.remat policy and name the fastest that fits")
  parser.add_argument("--no-cost", action="store_true",
                      help="skip the loop-free cost compiles (memory, collectives and the per-op estimate "
                      "only; the cost and estimate fields are then null)")
  parser.add_argument("--hlo-out", default=None, metavar="FILE", help="write the optimised HLO here")
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _run_compile(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  if not jax.config.jax_platforms:  # compiles for topology devices: no local accelerator is opened
    jax.config.update("jax_platforms", "cpu")
  devices = aot.topology_devices(args.topology)
  config = config_lib.load_config(args.config, overrides)
  objective = args.objective or config.train.objective
  model_cfg = aot.model_config(config, args.model_config)
  policies = list(REMAT_POLICIES) if args.sweep_remat else [model_cfg.remat]
  reports = []
  for policy in policies:
    report, text = aot.compile_objective(config, model_cfg.replace(remat=policy), objective, devices,
                                         args.topology, cost=not args.no_cost)
    reports.append(report)
    if args.hlo_out and policy == model_cfg.remat:
      with open(args.hlo_out, "w") as f:
        f.write(text)
  chosen = aot.best_remat(reports) if args.sweep_remat else reports[0]
  shown = chosen or reports[0]
  if args.json:
    result = shown.to_json()
    if args.sweep_remat:
      result["remat_sweep"] = [r.to_json() for r in reports]
      result["best_remat"] = chosen.remat if chosen else None
    print(json.dumps(result, indent=1), flush=True)
  else:
    for report in reports:
      print(aot.format_report(report), flush=True)
    if args.sweep_remat:
      print(aot.sweep_verdict(reports), flush=True)
  if not shown.fits:
    print("cftjax: error: " + "; ".join(aot.advice(shown, config)), file=sys.stderr)
    return 3
  return 0


def _add_plot_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("run_dir", help="a run directory written by `cftjax train`")


def _run_plot(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  del overrides
  for path in plots.plot_run(args.run_dir):
    print(path)
  return 0


def _run_doctor(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  del args, overrides
  print(f"code sandbox (rl.code.isolation = \"bwrap\"): {sandbox.check_isolation('bwrap')}")
  return 0


SUBCOMMANDS = (
    Subcommand("train", "CFT or GRPO training (config.train.objective) from a config file",
               _add_train_arguments, _run_train, takes_config_overrides=True),
    Subcommand("eval", "run a benchmark suite on a checkpoint", _add_eval_arguments, _run_eval,
               takes_config_overrides=True),
    Subcommand("convert", "Hugging Face dir <-> cftjax checkpoint", _add_convert_arguments, _run_convert),
    Subcommand("generate", "sample completions of chat prompts from a checkpoint", _add_generate_arguments,
               _run_generate),
    Subcommand("serve", "an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions) over a checkpoint",
               _add_serve_arguments, _run_serve),
    Subcommand("data", "build a TFDS ArrayRecord dataset, build critique data, or inspect a config's training data",
               _add_data_arguments, _run_data, takes_config_overrides=True),
    Subcommand("plot", "PNG curves of a run's metrics", _add_plot_arguments, _run_plot),
    Subcommand("doctor", "check this machine: which code-sandbox isolation is active",
               lambda parser: None, _run_doctor),
    Subcommand("compile", "compile a run's step for a TPU topology ahead of time (no TPU, no weights): "
               "memory, estimated step time and MFU, collectives", _add_compile_arguments, _run_compile,
               takes_config_overrides=True),
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="cftjax", description="JAX critique fine-tuning and critique RL.")
  parser.add_argument("--log_level", default="INFO", help="Python logging level (DEBUG, INFO, ...)")
  parser.add_argument("--debug", action="store_true",
                      help="show the full traceback of an error instead of a one-line message")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for command in SUBCOMMANDS:
    command.add_arguments(commands.add_parser(command.name, help=command.help, description=command.help))
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the `cftjax` console script; returns the process exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  try:
    overrides, rest = config_lib.split_override_args(argv)
  except config_lib.ConfigError as e:
    parser.error(str(e))
  args = parser.parse_args(rest)
  command = next(c for c in SUBCOMMANDS if c.name == args.command)
  if overrides and not command.takes_config_overrides:
    parser.error(f"`cftjax {command.name}` takes no --config.* overrides")
  logging.basicConfig(level=args.log_level.upper(),
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  if logging.getLogger().level > logging.DEBUG:
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO
    # JAX logs at INFO each platform plugin it probes and cannot start ("Unable to initialize backend 'tpu'")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  if command.name in ("train", "eval", "generate", "serve"):
    host_memory.log_huge_pages_hint()
  try:
    return command.run(args, overrides)
  except KeyboardInterrupt:
    print(f"cftjax: interrupted (Ctrl-C); exit code {EXIT_INTERRUPTED}", file=sys.stderr)
    return EXIT_INTERRUPTED
  except Exception as e:  # pylint: disable=broad-except
    if args.debug or not _is_input_error(e):
      raise
    print(f"cftjax: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2 if isinstance(e, config_lib.ConfigError) else 1


def _is_input_error(error: Exception) -> bool:
  """Errors that describe bad input or a failed run in words (shown as one line without --debug):
  cftjax's own error types (ConfigError, DataError, CheckpointError, ...), ValueError and OSError
  (e.g. FileNotFoundError). Anything else is a bug and keeps its traceback."""
  return isinstance(error, (ValueError, OSError)) or type(error).__module__.startswith("cftjax.")


if __name__ == "__main__":
  sys.exit(main())
