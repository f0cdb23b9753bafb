"""The ``jaxprune`` command: parses arguments and hands over to ``jaxprune._commands``."""
from __future__ import annotations

import argparse
import sys

from jaxprune.errors import JaxpruneError

COMMANDS = ("eval", "prune", "depth", "convert", "export")


def build_parser() -> argparse.ArgumentParser:
  import importlib

  parser = argparse.ArgumentParser(prog="jaxprune", description="Post-training pruning of LLMs in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)
  for name in COMMANDS:
    try:
      module = importlib.import_module(f"jaxprune._commands.{name}")
    except ModuleNotFoundError as err:
      if err.name != f"jaxprune._commands.{name}":
        raise
      continue
    module.add_parser(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    args.run(args)
  except JaxpruneError as err:
    print(f"jaxprune {args.command}: error: {err}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"jaxprune {args.command}: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
