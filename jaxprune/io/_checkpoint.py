"""jaxprune checkpoints: Orbax param (and mask) trees plus one JSON file of config and metadata.

Layout of a checkpoint directory::

  jaxprune.json   format version, model config, the params' dtype, metadata (method, calibration hash,
                  per-layer results, ...)
  params/         Orbax tree of the params, each in the dtype it was saved in
  masks/          Orbax tree of the pruning masks (optional), as bits: see :func:`pack_masks`
  tokenizer/      the tokenizer, saved with ``save_pretrained`` (optional)

A streamed model (``params["layers"]`` a :class:`~jaxprune.io._stream.Blocks`) is written block by block
instead, each block read, written and dropped in turn: ``params/`` then holds everything but the blocks, and
``layers/NNNNN/params.safetensors`` (and ``layers/NNNNN/masks.safetensors``) one block each, every leaf a tensor
named by its path, written with direct I/O (:func:`write_block`). Checkpoints written before held an Orbax tree
per block there (``layers/NNNNN/params/``), which still reads. Both layouts read the same;
:func:`read_checkpoint` with ``lazy=True`` gives the blocks of the second as a ``Blocks`` again.

Everything is written into a temporary sibling directory and renamed into place, so a crash never leaves a
half-written checkpoint under the final name.
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxprune import _tree as tree
from jaxprune.errors import JaxpruneError
from jaxprune.io._atomic import atomic_dir
from jaxprune.io._stream import (Blocks, Lazy, SafetensorsFiles, file_ranges, files_of, is_streamed, join, prefetch,
                                 split, timed, write_behind, write_safetensors)
from jaxprune.models._config import ModelConfig
from jaxprune.models._model import Params, abstract_params
from jaxprune.runner._distributed import barrier, is_primary, local_checkpointer, save_local

FORMAT = "jaxprune-checkpoint/1"  # one Orbax tree of all params (and one of all masks)
BLOCKED_FORMAT = "jaxprune-checkpoint/2"  # written block by block: see save_checkpoint
META_FILE = "jaxprune.json"
BLOCK_FILE_FORMAT = "jaxprune-block/1"  # the __metadata__ format of a block's safetensors file


def is_checkpoint(path: Path) -> bool:
  return (Path(path) / META_FILE).is_file()


def save_tree(path: Path, tree) -> None:
  """Writes ``tree`` (of arrays) as an Orbax tree at ``path``, which must not exist."""
  with timed("write"):
    save_local(path.absolute(), jax.tree.map(np.asarray, tree))


def pack_masks(masks):
  """``masks`` (boolean keep masks) as written: a mask whose last axis is a multiple of 8 becomes that axis's bits,
  8 to a byte (``np.packbits``, an eighth of the bytes); any other leaf stays as it is. :func:`unpack_masks`
  reverses it (a checkpoint written before masks were packed holds booleans only, which it leaves alone)."""
  def pack(mask):
    mask = np.asarray(mask)
    return np.packbits(mask, axis=-1) if mask.dtype == np.bool_ and mask.shape[-1] % 8 == 0 else mask
  return jax.tree.map(pack, masks)


def unpack_masks(masks):
  """The boolean masks of a tree written by :func:`pack_masks` (bytes of bits along the last axis)."""
  return jax.tree.map(lambda m: np.unpackbits(m, axis=-1).view(np.bool_) if m.dtype == np.uint8 else m, masks)


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
  quiet_stray_reads()
  with timed("read"), local_checkpointer() as ckptr:
    if abstract is not None:
      saved = ckptr.metadata(path.absolute()).item_metadata.tree
      abstract = jax.tree.map(lambda like, meta: jax.ShapeDtypeStruct(like.shape, dtype or meta.dtype),
                              abstract, saved)
    return ckptr.restore(path.absolute(), abstract)


def save_checkpoint(out: Path, config: ModelConfig, params: Params, *, masks=None, metadata: dict | None = None,
                    tokenizer=None, overwrite: bool = False) -> Path:
  """Writes a checkpoint atomically. ``out`` must not exist, unless it is a jaxprune checkpoint and ``overwrite``.
  In a multi-process run process 0 alone writes it, and every process returns once it is written."""
  out = Path(out)
  if not is_primary():
    barrier(f"checkpoint {out}")
    return out
  if out.exists():
    if not is_checkpoint(out):
      raise JaxpruneError(f"output directory {out} exists and is not a jaxprune checkpoint")
    if not overwrite:
      raise JaxpruneError(f"checkpoint {out} exists; pass --overwrite to replace it")
  blocked, dtype = is_streamed(params), tree_dtype(params)
  with atomic_dir(out, replace=True) as tmp:
    if blocked:
      _save_blocks(tmp, params, masks)
    else:
      save_tree(tmp / "params", params)
      if masks is not None:
        save_tree(tmp / "masks", pack_masks(masks))
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp / "tokenizer"))
    meta = {"format": BLOCKED_FORMAT if blocked else FORMAT, "config": json.loads(config.to_json()),
            "dtype": dtype, "has_masks": masks is not None, "metadata": metadata or {}}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
  barrier(f"checkpoint {out}")
  return out


def _block_dir(root: Path, i: int) -> Path:
  return root / "layers" / f"{i:05d}"


class SavedBlock:
  """One block's params (or masks) already written as one safetensors file at ``path`` (:func:`write_block`), read
  when called: an entry of :class:`~jaxprune.io._stream.Blocks` that :func:`save_checkpoint` links into place
  instead of writing again. ``missing``: what a call returns when nothing was written (a block without masks);
  ``owner``: the directory named in errors; ``masks``: the file holds masks written by :func:`pack_masks`;
  ``abstract``: the tree the block must have (a file lacking one of its tensors is damaged); ``dtype``: the
  params come in it (else each in the dtype it was written in)."""

  def __init__(self, path: Path, owner: Path, missing=None, masks: bool = False, abstract=None, dtype=None):
    self.path, self.owner, self.missing, self.masks = Path(path), Path(owner), missing, masks
    self.abstract, self.dtype = abstract, dtype

  def __call__(self):
    if self.missing is not None and not self.path.exists():
      return self.missing
    block = self._read()
    return unpack_masks(block) if self.masks else block

  def _read(self):
    try:
      files = SafetensorsFiles([self.path])
      if self.abstract is not None:
        lacking = sorted(set(tree.flatten(self.abstract)) - set(files.dtypes))
        if lacking:
          raise JaxpruneError(f"{self.path} lacks {', '.join(lacking[:3])}")
      flat = {name: files.get(name) for name in files.dtypes}
    except (JaxpruneError, OSError) as err:
      raise JaxpruneError(f"{self.owner}: checkpoint is corrupt or incomplete ({err})") from None
    if self.dtype is not None:
      flat = {k: v.astype(self.dtype) for k, v in flat.items()}
    return tree.unflatten(flat)

  def ranges(self) -> list:
    """The files a call reads, for :meth:`~jaxprune.io._stream.Blocks.prefetch`."""
    return file_ranges(self.path)


class SavedTree(SavedBlock):
  """A :class:`SavedBlock` written as an Orbax tree (a directory) at ``path``, as checkpoints written block by
  block held their blocks before they were written as safetensors."""

  def _read(self):
    return _restore_or_fail(self.owner, self.path, self.abstract, self.dtype)


def write_block(root: Path, name: str, block) -> None:
  """Writes one block's ``params`` (or its ``masks``, packed by :func:`pack_masks`) as ``root/<name>.safetensors``,
  each leaf a tensor named by its path (``attn/q_proj/kernel``), with direct I/O
  (:func:`~jaxprune.io._stream.write_safetensors`)."""
  write_safetensors(root / f"{name}.safetensors", {k: np.asarray(v) for k, v in tree.flatten(block).items()},
                    {"format": BLOCK_FILE_FORMAT})


def saved_block(root: Path, name: str, owner: Path, **options) -> SavedBlock:
  """The entry reading block ``root``'s ``name`` (``"params"`` or ``"masks"``): its safetensors file, or the Orbax
  tree that checkpoints written before held there."""
  if (root / name).is_dir():
    return SavedTree(root / name, owner, **options)
  return SavedBlock(root / f"{name}.safetensors", owner, **options)


def _link(source: Path, dest: Path) -> None:
  """``dest`` as a copy of the file or directory ``source`` made of hard links (a copy where links are not
  possible)."""
  with timed("write"):
    for file in files_of(source):
      target = dest if file == source else dest / file.relative_to(source)
      target.parent.mkdir(parents=True, exist_ok=True)
      try:
        os.link(file, target)
      except OSError:
        shutil.copy2(file, target)


def _save_blocks(root: Path, params: dict, masks: dict | None) -> None:
  """Writes ``params`` (and ``masks``) block by block (the blocked layout). Blocks already written
  (:class:`SavedBlock`) are linked, not read and written again; the others are written on the background writing
  thread (:func:`~jaxprune.io._stream.write_behind`) while the next one is read, so that at most two blocks are
  held. Returns once everything is written, also when reading a block fails (nothing is left writing into
  ``root``)."""
  save_tree(root / "params", split(params)[0])  # the embeddings and head, read (if lazy) and dropped
  layers = params["layers"]
  mask_layers = masks["layers"] if masks is not None else None
  pending = None
  try:
    for i in range(len(layers)):
      prefetch(layers, i + 1)  # read while block i is written
      values = {}
      for name, blocks in (("params", layers), ("masks", mask_layers)):
        if blocks is None:
          continue
        entry = blocks.entry(i) if isinstance(blocks, Blocks) else blocks[i]
        if isinstance(entry, SavedBlock):
          if entry.path.exists():
            _link(entry.path, _block_dir(root, i) / entry.path.name)
          continue
        value = entry() if callable(entry) else entry
        if name == "params":
          values[name] = value
        elif value:
          values[name] = pack_masks(value)
        del value
      _wait_for(pending)
      pending = write_behind(functools.partial(_write_blocks, _block_dir(root, i), values)) if values else None
  finally:
    if pending is not None:
      with timed("write"):
        concurrent.futures.wait([pending])
  _wait_for(pending)


def _write_blocks(root: Path, values: dict) -> None:
  for name, value in values.items():
    write_block(root, name, value)


def _wait_for(pending: concurrent.futures.Future | None) -> None:
  """Waits for a write given to the background thread (raising what it raised)."""
  if pending is not None:
    with timed("write"):
      pending.result()


def read_meta(path: Path) -> dict:
  path = Path(path)
  try:
    meta = json.loads((path / META_FILE).read_text())
  except (OSError, json.JSONDecodeError) as err:
    raise JaxpruneError(f"{path} is not a readable jaxprune checkpoint: {err}") from None
  if meta.get("format") not in (FORMAT, BLOCKED_FORMAT):
    raise JaxpruneError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT} or "
                        f"{BLOCKED_FORMAT})")
  return meta


def tree_dtype(params: Params) -> str:
  """The name of the float dtype holding most parameters of ``params`` (``float32``, ``bfloat16``, ...)."""
  sizes: dict[str, int] = {}
  rest, layers = split(params, read=False) if is_streamed(params) else (params, ())
  for leaf in jax.tree.leaves(rest) + [x for i in range(len(layers)) for x in jax.tree.leaves(layers.abstract(i))]:
    sizes[np.dtype(leaf.dtype).name] = sizes.get(np.dtype(leaf.dtype).name, 0) + int(np.size(leaf))
  return max(sorted(sizes), key=sizes.__getitem__) if sizes else "float32"


def read_checkpoint(path: Path, *, with_masks: bool = False, dtype=None, lazy: bool = False):
  """Returns ``(config, params, masks or None, metadata)``; a damaged checkpoint gives a one-line error.

  The params come in ``dtype``, or else each in the dtype it was saved in. ``lazy``: the blocks of a checkpoint
  written block by block come as a :class:`~jaxprune.io._stream.Blocks`, each read when used (a damaged block
  then gives the one-line error when it is read); a checkpoint written in one piece is read whole either way.

  :func:`jaxprune.io.load_checkpoint` returns the same as a :class:`~jaxprune.io.LoadedModel`.
  """
  path = Path(path)
  meta = read_meta(path)
  try:
    config = ModelConfig.from_json(json.dumps(meta["config"]))
  except (KeyError, TypeError) as err:
    raise JaxpruneError(f"{path}: checkpoint config is damaged: {err}") from None
  abstract = abstract_params(config)
  want_masks = with_masks and meta.get("has_masks")
  if meta["format"] == FORMAT:
    params = _restore_or_fail(path, path / "params", abstract, dtype)
    masks = unpack_masks(_restore_or_fail(path, path / "masks", None)) if want_masks else None
    return config, params, masks, meta.get("metadata", {})
  rest, abstract_layers = split(abstract)
  saved_dtype = dtype or meta.get("dtype")

  def block(i: int):
    return saved_block(_block_dir(path, i), "params", path, abstract=abstract_layers[i], dtype=dtype)

  def block_masks(i: int):
    return saved_block(_block_dir(path, i), "masks", path, missing={}, masks=True)

  def abstract_block(i: int):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, saved_dtype or x.dtype), abstract_layers[i])

  n = len(abstract_layers)
  layers = Blocks([block(i) for i in range(n)], abstract=abstract_block)
  mask_layers = Blocks([block_masks(i) for i in range(n)]) if want_masks else None
  if lazy:
    def read_rest():
      return _restore_or_fail(path, path / "params", rest, dtype)

    abstract_rest = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, saved_dtype or x.dtype), rest)
    params = join({k: Lazy(k, read_rest, v) for k, v in abstract_rest.items()}, layers)
  else:
    params = join(_restore_or_fail(path, path / "params", rest, dtype), layers[:])
  masks = None if mask_layers is None else {"layers": mask_layers if lazy else mask_layers[:]}
  return config, params, masks, meta.get("metadata", {})


def _restore_or_fail(checkpoint: Path, tree_path: Path, abstract, dtype=None):
  """:func:`_restore_tree`, with any failure a one-line error naming the checkpoint."""
  try:
    return _restore_tree(tree_path, abstract, dtype)
  except Exception as err:  # Orbax raises many types for missing or truncated files
    raise JaxpruneError(f"{checkpoint}: checkpoint is corrupt or incomplete ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
