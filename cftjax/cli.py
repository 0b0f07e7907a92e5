"""The `cftjax` command line: one subcommand per task (`cftjax train`, `cftjax plot`, ...).

A subcommand is a `Subcommand(name, help, add_arguments, run)` in SUBCOMMANDS; `run(args, overrides)`
returns the exit code. `--config.a.b=v` overrides are split off before argparse sees the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence


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
  from cftjax import config as config_lib  # pylint: disable=import-outside-toplevel
  from cftjax.train import cft_trainer  # pylint: disable=import-outside-toplevel

  config = config_lib.load_config(args.config, overrides)
  summary = cft_trainer.train(config)
  print(cft_trainer.format_summary(summary), flush=True)
  return 0


def _add_plot_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("run_dir", help="a run directory written by `cftjax train`")


def _run_plot(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  del overrides
  from cftjax.train import plots  # pylint: disable=import-outside-toplevel

  for path in plots.plot_run(args.run_dir):
    print(path)
  return 0


SUBCOMMANDS = (
    Subcommand("train", "critique fine-tuning (CFT) from a config file", _add_train_arguments,
               _run_train, takes_config_overrides=True),
    Subcommand("plot", "PNG curves of a run's metrics", _add_plot_arguments, _run_plot),
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="cftjax", description="JAX critique fine-tuning and critique RL.")
  parser.add_argument("--log_level", default="INFO", help="Python logging level (DEBUG, INFO, ...)")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for command in SUBCOMMANDS:
    command.add_arguments(commands.add_parser(command.name, help=command.help, description=command.help))
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the `cftjax` console script; returns the process exit code."""
  from cftjax.config import ConfigError, split_override_args  # pylint: disable=import-outside-toplevel

  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  try:
    overrides, rest = split_override_args(argv)
  except ConfigError as e:
    parser.error(str(e))
  args = parser.parse_args(rest)
  command = next(c for c in SUBCOMMANDS if c.name == args.command)
  if overrides and not command.takes_config_overrides:
    parser.error(f"`cftjax {command.name}` takes no --config.* overrides")
  logging.basicConfig(level=args.log_level.upper(),
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  if logging.getLogger().level > logging.DEBUG:
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO
  try:
    return command.run(args, overrides)
  except ConfigError as e:
    print(f"cftjax {command.name}: config error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
