"""What the subcommands share: model, data and evaluation arguments, loading with messages, the JSON document.

Every subcommand's ``--json`` document has the same layout: ``command``, ``jaxprune_version``, ``model``, ``out``
(None for ``eval``), ``seconds`` (the whole command); when a perplexity was measured, ``eval`` (data, sha256,
dtype, seqlen, windows, tokens, perplexity, mean_loss, seconds, tokens_per_second) and its ``perplexity``, and with
``--eval-dense`` the same for the model before pruning as ``eval_dense`` and ``dense_perplexity``; then the
command's own keys. ``--json -`` writes the document, and only it, to stdout; everything else goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jaxprune.errors import JaxpruneError
from jaxprune.io._atomic import atomic_write
from jaxprune.io._load import DEFAULT_MODEL, LoadedModel, load_model

DEFAULT_EVAL = "austen"
DEFAULT_CALIB = "wiki"
# One evaluation rule for eval, prune --eval and depth --eval.
DEFAULT_EVAL_SEQLEN = 512
DEFAULT_EVAL_WINDOWS = 32


def _integer(text: str, lowest: int, what: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
  if value < lowest:
    raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
  return value


def positive_int(text: str) -> int:
  """An argparse type: an integer >= 1."""
  return _integer(text, 1, "a positive integer")


def count(text: str) -> int:
  """An argparse type: an integer >= 0 (0 meaning "all")."""
  return _integer(text, 0, "an integer >= 0")


def add_model_arg(p, help_extra: str = "") -> None:
  p.add_argument("--model", default=DEFAULT_MODEL,
                 help=f"embedded name ({DEFAULT_MODEL}), jaxprune checkpoint, HF directory, .gguf file, "
                      f"or HF hub name (cached, or online){help_extra} [default: %(default)s]")


def add_dtype_arg(p) -> None:
  """``--dtype``: the dtype the model's weights are held and computed in (statistics and solvers: float32)."""
  from jaxprune.io._load import DTYPES

  p.add_argument("--dtype", choices=DTYPES, default=None,
                 help="dtype of the weights as held and computed (statistics and solvers always run in float32) "
                      "[default: a Hugging Face directory's stored dtype, a checkpoint's saved dtype, float32 for "
                      "GGUF]")


def add_stream_arg(p) -> None:
  """``--stream``: decoder blocks read from disk when used, a pruned model written block by block."""
  p.add_argument("--stream", action="store_true",
                 help="read the decoder blocks from disk when they are used and write results block by block: "
                      "host memory about one block plus the embeddings, for models larger than memory (Hugging "
                      "Face safetensors directories, GGUF files, checkpoints written with --stream)")


def with_io_seconds(args, doc: dict) -> dict:
  """``doc`` with the command's weight reads and writes in seconds (``io_seconds``) when it ran with ``--stream``."""
  if not getattr(args, "stream", False):
    return doc
  from jaxprune.io._stream import IO_SECONDS

  return {**doc, "io_seconds": {k: round(v, 2) for k, v in IO_SECONDS.items()}}


def add_batch_arg(p) -> None:
  p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward batch [default: %(default)s]")


def add_calib_args(p, *, nsamples: int) -> None:
  """Calibration data options shared by ``prune`` and ``depth``."""
  p.add_argument("--calib", default=DEFAULT_CALIB,
                 help="calibration data: bundled corpus, text file, .npy windows, or c4/wikitext2 (online) "
                      "[default: %(default)s]")
  p.add_argument("--nsamples", type=positive_int, default=nsamples, help="calibration windows [default: %(default)s]")
  p.add_argument("--seqlen", type=positive_int, default=512,
                 help="tokens per calibration window [default: %(default)s]")
  add_batch_arg(p)


def add_eval_args(p, *, data_flag: str) -> None:
  """Evaluation options: the data (``--data`` for ``eval``, ``--eval`` elsewhere), its window length and count."""
  if data_flag == "--data":
    p.add_argument("--data", default=DEFAULT_EVAL,
                   help="bundled corpus name, text file, .npy token windows (n, seqlen), or wikitext2/c4/ptb "
                        "(online) [default: %(default)s]")
  else:
    p.add_argument("--eval", default=None, help="evaluate perplexity on this data afterwards (e.g. austen)")
    p.add_argument("--eval-dense", action="store_true", help="also evaluate the model before pruning")
  names = ("--seqlen", "--eval-seqlen") if data_flag == "--data" else ("--eval-seqlen",)
  p.add_argument(*names, dest="eval_seqlen", type=positive_int, default=None, metavar="N",
                 help=f"tokens per evaluation window [default: {DEFAULT_EVAL_SEQLEN}; a .npy file's own width]")
  names = ("--max-windows", "--max-eval-windows") if data_flag == "--data" else ("--max-eval-windows",)
  p.add_argument(*names, dest="max_eval_windows", type=count, default=DEFAULT_EVAL_WINDOWS, metavar="N",
                 help="evaluate the first this many windows; 0 = all [default: %(default)s]")


def add_output_args(p) -> None:
  """Checkpoint, evaluation and JSON options shared by ``prune`` and ``depth``."""
  p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
  p.add_argument("--overwrite", action="store_true", help="replace an existing jaxprune checkpoint")
  add_eval_args(p, data_flag="--eval")
  add_json_arg(p)


def add_json_arg(p) -> None:
  p.add_argument("--json", default=None, metavar="PATH",
                 help="write the result as JSON to this file, or to stdout with - (then nothing else goes there)")


def add_distributed_args(p) -> None:
  """``--coordinator``, ``--num-processes``, ``--process-id``: one command run by several processes (hosts)
  together, each with the same arguments (see :func:`join`)."""
  from jaxprune.runner._distributed import DEFAULT_TIMEOUT

  g = p.add_argument_group("multi-process runs (automatic on Cloud TPU slices, SLURM and Open MPI; otherwise give "
                           "all three on every process)")
  g.add_argument("--coordinator", metavar="HOST:PORT",
                 help="address of process 0, which serves the coordinator on PORT; every process gives the same")
  g.add_argument("--num-processes", type=positive_int, metavar="N", help="number of processes in the run")
  g.add_argument("--process-id", type=count, metavar="I", help="this process's index, 0 .. N-1")
  g.add_argument("--coordinator-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                 help="how long to wait for the coordinator and the other processes [default: %(default)s]")


def add_mesh_arg(p) -> None:
  """``--model-axis``: the devices as a ``(data, model)`` mesh, see :func:`mesh`."""
  p.add_argument("--model-axis", type=positive_int, default=1, metavar="N",
                 help="arrange the devices (of all processes) as a (data, model) mesh with N along model: each "
                      "block's large parameters are split over those N devices and the solvers' rows with them, "
                      "for blocks too large for one device; N must divide the number of devices "
                      "[default: %(default)s, every device holds whole blocks]")


def mesh(args):
  """The mesh of a command: ``("data",)`` over every device, or ``("data", "model")`` with ``--model-axis``."""
  from jaxprune.runner import make_mesh

  return make_mesh(model=getattr(args, "model_axis", 1))


def join(args) -> None:
  """Joins the multi-process run the arguments describe (explicitly, or as JAX detects it) before any JAX
  computation; a command without the options runs in one process."""
  if not hasattr(args, "coordinator"):
    return
  from jaxprune.runner._distributed import initialize

  if initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                timeout=args.coordinator_timeout):
    import jax

    log(f"multi-process run: {jax.process_count()} processes, {jax.device_count()} devices "
        f"({jax.local_device_count()} on process 0)")
  if hasattr(args, "model_axis"):
    mesh(args)  # a --model-axis that does not divide the devices fails before any work


def _primary() -> bool:
  from jaxprune.runner._distributed import is_primary

  return is_primary()


def log(message: str) -> None:
  """Progress and notes: always stderr (process 0 alone in a multi-process run)."""
  if _primary():
    print(message, file=sys.stderr, flush=True)


def say(args, message: str) -> None:
  """The human-readable result: stdout, unless ``--json -`` reserves stdout for the JSON document (process 0
  alone in a multi-process run)."""
  if _primary():
    print(message, file=sys.stderr if getattr(args, "json", None) == "-" else sys.stdout, flush=True)


def load(spec: str, **kwargs) -> LoadedModel:
  start = time.perf_counter()
  model = load_model(spec, **kwargs)
  c = model.config
  log(f"loaded {spec}: {c.family}, {c.num_layers} layers, hidden {c.hidden_size}, {model.dtype} "
      f"({time.perf_counter() - start:.1f} s)")
  return model


def windows(model: LoadedModel, source: str, *, seqlen: int | None, role: str, nsamples: int | None = None,
            max_windows: int | None = None, seed: int = 0):
  """Token windows of ``source`` for ``model`` (see :func:`jaxprune.data.load_windows`); ``seqlen`` None: a
  ``.npy`` file's own width, else :data:`DEFAULT_EVAL_SEQLEN`."""
  from jaxprune.data import load_windows

  npy = str(source).endswith(".npy")
  if seqlen is None and not npy:
    seqlen = DEFAULT_EVAL_SEQLEN
  limit = model.config.max_position_embeddings
  for n in (seqlen,) if seqlen is not None else ():  # checked before any tokenization
    if n < 2:
      raise JaxpruneError(f"seqlen must be at least 2, got {n}")
    if n > limit:
      raise JaxpruneError(f"seqlen {n} exceeds the model's {limit} positions (max_position_embeddings)")
  data = load_windows(source, tokenizer=None if npy else model.tokenizer, seqlen=seqlen, role=role,
                      nsamples=nsamples, max_windows=max_windows, seed=seed, vocab_size=model.config.vocab_size)
  if data.seqlen > limit:
    raise JaxpruneError(f"{source}: seqlen {data.seqlen} exceeds the model's {limit} positions")
  if data.seqlen < 2:
    raise JaxpruneError(f"{source}: windows of {data.seqlen} token; perplexity needs at least 2")
  return data


def eval_windows(args, model: LoadedModel, source: str):
  """The evaluation windows of ``source`` by the one evaluation rule (``--eval-seqlen``, ``--max-eval-windows``)."""
  return windows(model, source, seqlen=args.eval_seqlen, role="eval", max_windows=args.max_eval_windows or None)


def evaluate(args, params, config, data, *, mesh, desc: str = "eval") -> dict:
  """Perplexity of ``params`` on ``data`` (:class:`~jaxprune.data.TokenWindows`) as the JSON ``eval`` block."""
  from jaxprune._evaluate import perplexity

  log(f"{desc}: {data.num_windows} windows x {data.seqlen} tokens of {data.source}")
  result = perplexity(params, data.tokens, config=config, batch_size=args.batch_size, mesh=mesh)
  from jaxprune.io._checkpoint import tree_dtype

  return {"data": data.source, "sha256": data.sha256, "dtype": tree_dtype(params), **result.to_json()}


def eval_result(block: dict | None, dense: dict | None = None) -> dict:
  """The ``eval``/``perplexity`` (and ``eval_dense``/``dense_perplexity``) keys of the JSON document."""
  out = {}
  if block is not None:
    out.update(eval=block, perplexity=block["perplexity"])
  if dense is not None:
    out.update(eval_dense=dense, dense_perplexity=dense["perplexity"])
  return out


def check_json_out(path) -> None:
  """Refuses a ``--json`` path that cannot be written (a directory, a parent that is a file), before any work."""
  if path is None or str(path) == "-":
    return
  path = Path(path)
  if path.is_dir():
    raise JaxpruneError(f"--json {path} is a directory; give a file name (or - for stdout)")
  parent = next((p for p in path.parents if p.exists()), None)
  if parent is not None and not parent.is_dir():
    raise JaxpruneError(f"--json {path}: {parent} is not a directory")


def document(args, result: dict, *, version: str, seconds: float) -> dict:
  """The JSON document of a finished command (see the module docstring)."""
  out = getattr(args, "out", None)
  return {"command": args.command, "jaxprune_version": version, "model": args.model,
          "out": None if out is None else str(out), "seconds": round(seconds, 3), **result}


def write_json(path, doc: dict) -> None:
  """``doc`` to stdout (``path`` ``-``) or atomically to the file ``path`` (by process 0 alone in a multi-process
  run)."""
  if path is None or not _primary():
    return
  text = json.dumps(doc, indent=1, sort_keys=True, default=str)
  if str(path) == "-":
    print(text, flush=True)
  else:
    atomic_write(path, text + "\n")
