"""The ``jaxprune`` command: parses arguments and hands over to ``jaxprune._commands``."""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
import time

from jaxprune.errors import JaxpruneError

COMMANDS = ("eval", "prune", "depth", "convert", "export", "retrain")


def version() -> str:
  """The installed jaxprune version (package metadata)."""
  try:
    return importlib.metadata.version("jaxprune")
  except importlib.metadata.PackageNotFoundError:
    return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxprune", description="Post-training pruning of LLMs in JAX.")
  parser.add_argument("--version", action="version", version=f"jaxprune {version()}")
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
  from jaxprune._commands import common
  from jaxprune._compile_cache import command_line_cache

  args = build_parser().parse_args(argv)
  start = time.perf_counter()
  command_line_cache()  # before any compilation
  try:
    common.check_json_out(args.json)  # outputs are checked before any work
    common.join(args)  # a multi-process run is joined before any JAX computation
    result = args.run(args)
    common.write_json(args.json, common.document(args, result, version=version(),
                                                 seconds=time.perf_counter() - start))
  except JaxpruneError as err:
    print(f"jaxprune {args.command}: error: {err}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"jaxprune {args.command}: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
