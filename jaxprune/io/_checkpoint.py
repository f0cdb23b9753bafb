"""jaxprune checkpoints: Orbax param (and mask) trees plus one JSON file of config and metadata.

Layout of a checkpoint directory::

  jaxprune.json   format version, model config, the params' dtype, metadata (method, calibration hash,
                  per-layer results, ...)
  params/         Orbax tree of the params, each in the dtype it was saved in
  masks/          Orbax tree of the pruning masks (optional)
  tokenizer/      the tokenizer, saved with ``save_pretrained`` (optional)

Everything is written into a temporary sibling directory and renamed into place, so a crash never leaves a
half-written checkpoint under the final name.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxprune.errors import JaxpruneError
from jaxprune.io._atomic import atomic_dir
from jaxprune.models._config import ModelConfig
from jaxprune.models._model import Params, abstract_params

FORMAT = "jaxprune-checkpoint/1"
META_FILE = "jaxprune.json"


def is_checkpoint(path: Path) -> bool:
  return (Path(path) / META_FILE).is_file()


def _save_tree(path: Path, tree) -> None:
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path.absolute(), jax.tree.map(np.asarray, tree))
    ckptr.wait_until_finished()


_TENSORSTORE_STATUS = re.compile(r"^[A-Z_]+: ")  # absl status codes: "OUT_OF_RANGE: ...", "DATA_LOSS: ..."


def quiet_stray_reads() -> None:
  """Silences what reads still in flight print after a restore fails; called before every restore.

  When one tensorstore read of a damaged checkpoint fails, the others finish on their own threads: their callbacks
  into Orbax's event loop, already closed, raise ``RuntimeError: Event loop is closed`` (printed as unraisable
  exceptions), and their failed tasks, garbage-collected unread, are logged by ``asyncio`` as "Task exception was
  never retrieved" with a tensorstore status. Both can come before or after the one-line error that already says
  the checkpoint is damaged. This drops exactly those two messages: the closed-loop ``RuntimeError`` and unread
  tasks whose exception is a tensorstore status. Installed once, for the rest of the process.
  """
  previous = sys.unraisablehook
  if getattr(previous, "jaxprune_closed_loop", False):
    return

  def hook(unraisable):
    err = unraisable.exc_value
    if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
      return
    previous(unraisable)

  def keep(record: logging.LogRecord) -> bool:
    err = record.exc_info[1] if record.exc_info else None
    return not (str(record.msg).startswith("Task exception was never retrieved")
                and isinstance(err, ValueError) and _TENSORSTORE_STATUS.match(str(err)))

  hook.jaxprune_closed_loop = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(keep)


def _restore_tree(path: Path, abstract, dtype=None) -> Any:
  """The tree at ``path`` shaped like ``abstract``, each leaf in ``dtype`` or else in the dtype it was saved in."""
  import orbax.checkpoint as ocp

  quiet_stray_reads()
  with ocp.StandardCheckpointer() as ckptr:
    if abstract is not None:
      saved = ckptr.metadata(path.absolute()).item_metadata.tree
      abstract = jax.tree.map(lambda like, meta: jax.ShapeDtypeStruct(like.shape, dtype or meta.dtype),
                              abstract, saved)
    return ckptr.restore(path.absolute(), abstract)


def save_checkpoint(out: Path, config: ModelConfig, params: Params, *, masks=None, metadata: dict | None = None,
                    tokenizer=None, overwrite: bool = False) -> Path:
  """Writes a checkpoint atomically. ``out`` must not exist, unless it is a jaxprune checkpoint and ``overwrite``."""
  out = Path(out)
  if out.exists():
    if not is_checkpoint(out):
      raise JaxpruneError(f"output directory {out} exists and is not a jaxprune checkpoint")
    if not overwrite:
      raise JaxpruneError(f"checkpoint {out} exists; pass --overwrite to replace it")
  with atomic_dir(out, replace=True) as tmp:
    _save_tree(tmp / "params", params)
    if masks is not None:
      _save_tree(tmp / "masks", masks)
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp / "tokenizer"))
    meta = {"format": FORMAT, "config": json.loads(config.to_json()), "dtype": tree_dtype(params),
            "has_masks": masks is not None, "metadata": metadata or {}}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
  return out


def read_meta(path: Path) -> dict:
  path = Path(path)
  try:
    meta = json.loads((path / META_FILE).read_text())
  except (OSError, json.JSONDecodeError) as err:
    raise JaxpruneError(f"{path} is not a readable jaxprune checkpoint: {err}") from None
  if meta.get("format") != FORMAT:
    raise JaxpruneError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT})")
  return meta


def tree_dtype(params: Params) -> str:
  """The name of the float dtype holding most parameters of ``params`` (``float32``, ``bfloat16``, ...)."""
  sizes: dict[str, int] = {}
  for leaf in jax.tree.leaves(params):
    sizes[np.dtype(leaf.dtype).name] = sizes.get(np.dtype(leaf.dtype).name, 0) + int(np.size(leaf))
  return max(sorted(sizes), key=sizes.__getitem__) if sizes else "float32"


def read_checkpoint(path: Path, *, with_masks: bool = False, dtype=None):
  """Returns ``(config, params, masks or None, metadata)``; a damaged checkpoint gives a one-line error.

  The params come in ``dtype``, or else each in the dtype it was saved in.

  :func:`jaxprune.io.load_checkpoint` returns the same as a :class:`~jaxprune.io.LoadedModel`.
  """
  path = Path(path)
  meta = read_meta(path)
  try:
    config = ModelConfig.from_json(json.dumps(meta["config"]))
  except (KeyError, TypeError) as err:
    raise JaxpruneError(f"{path}: checkpoint config is damaged: {err}") from None
  abstract = abstract_params(config)
  try:
    params = _restore_tree(path / "params", abstract, dtype)
    masks = _restore_tree(path / "masks", None) if with_masks and meta.get("has_masks") else None
  except JaxpruneError:
    raise
  except Exception as err:  # Orbax raises many types for missing or truncated files
    raise JaxpruneError(f"{path}: checkpoint is corrupt or incomplete ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
  return config, params, masks, meta.get("metadata", {})
