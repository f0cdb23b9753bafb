"""What the subcommands share: model and data arguments, loading with messages, JSON output."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from jaxprune.errors import JaxpruneError
from jaxprune.io._atomic import atomic_write
from jaxprune.io._load import DEFAULT_MODEL, LoadedModel, load_model

DEFAULT_EVAL = "austen"
DEFAULT_CALIB = "wiki"


def add_model_arg(p, help_extra: str = "") -> None:
  p.add_argument("--model", default=DEFAULT_MODEL,
                 help=f"embedded name ({DEFAULT_MODEL}), jaxprune checkpoint, HF directory, .gguf file, "
                      f"or HF hub name (online){help_extra} [default: %(default)s]")


def add_calib_args(p, *, nsamples: int) -> None:
  """Calibration data options shared by ``prune`` and ``depth``."""
  p.add_argument("--calib", default=DEFAULT_CALIB,
                 help="calibration data: bundled corpus, text file, .npy windows, or c4/wikitext2 (online) "
                      "[default: %(default)s]")
  p.add_argument("--nsamples", type=int, default=nsamples, help="calibration windows [default: %(default)s]")
  p.add_argument("--seqlen", type=int, default=512, help="tokens per window [default: %(default)s]")
  p.add_argument("--batch-size", type=int, default=8, help="windows per forward batch [default: %(default)s]")


def add_output_args(p) -> None:
  """Checkpoint, evaluation and JSON options shared by ``prune`` and ``depth``."""
  p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
  p.add_argument("--overwrite", action="store_true", help="replace an existing jaxprune checkpoint")
  p.add_argument("--eval", default=None, help="evaluate perplexity on this data afterwards (e.g. austen)")
  p.add_argument("--max-eval-windows", type=int, default=0, help="limit evaluation windows; 0 = all")
  add_json_arg(p)


def add_json_arg(p) -> None:
  p.add_argument("--json", type=Path, default=None, help="write the results as JSON to this file")


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def load(spec: str, **kwargs) -> LoadedModel:
  start = time.perf_counter()
  model = load_model(spec, **kwargs)
  c = model.config
  log(f"loaded {spec}: {c.family}, {c.num_layers} layers, hidden {c.hidden_size} "
      f"({time.perf_counter() - start:.1f} s)")
  return model


def windows(model: LoadedModel, source: str, *, seqlen: int, role: str, nsamples: int | None = None,
            max_windows: int | None = None, seed: int = 0):
  """Token windows of ``source`` for ``model`` (see :func:`jaxprune.data.load_windows`)."""
  from jaxprune.data import load_windows

  if seqlen < 2:
    raise JaxpruneError(f"--seqlen must be at least 2, got {seqlen}")
  if seqlen > model.config.max_position_embeddings:
    raise JaxpruneError(f"seqlen {seqlen} exceeds the model's {model.config.max_position_embeddings} positions")
  needs_tokenizer = not str(source).endswith(".npy")
  return load_windows(source, tokenizer=model.tokenizer if needs_tokenizer else None, seqlen=seqlen, role=role,
                      nsamples=nsamples, max_windows=max_windows, seed=seed, vocab_size=model.config.vocab_size)


def check_json_out(path: Path | None) -> None:
  """Refuses a ``--json`` path that cannot be written (a directory, a parent that is a file), before any work."""
  if path is None or str(path) == "-":
    return
  path = Path(path)
  if path.is_dir():
    raise JaxpruneError(f"--json {path} is a directory; give a file name (or - for stdout)")
  parent = next((p for p in path.parents if p.exists()), None)
  if parent is not None and not parent.is_dir():
    raise JaxpruneError(f"--json {path}: {parent} is not a directory")


def write_json(path: Path | None, result: dict) -> None:
  """Prints ``result`` and, with ``path``, writes it atomically."""
  text = json.dumps(result, indent=1, sort_keys=True, default=str)
  print(text)
  if path is None:
    return
  atomic_write(path, text + "\n")
