"""Models larger than memory: decoder blocks read when they are used, and safetensors read range by range.

A streamed model's params are the usual dict, except that ``params["layers"]`` is a :class:`Blocks`: a sequence
whose entries are read from disk each time they are indexed (and dropped by the caller after use), so that the
host holds about one block at a time. The embeddings and the head are :class:`Lazy` entries, read when
:func:`split` separates them from the blocks (an ordinary pytree then) and dropped by the caller after use: a
7B model's embeddings and head are 0.5 GB in bfloat16, which a pass would otherwise hold beside its largest
solver.

Safetensors are read by byte range (``os.pread``) rather than memory-mapped: pages of a memory map that were
touched stay counted in the process's resident memory until the map is closed, so a memory-mapped 13 GB model
read block by block looks, and is accounted, as 13 GB resident. A block's linear weights are read one after the
other into one buffer (:meth:`SafetensorsFiles.get_transient`) and copied from there into the kernel layout.

Reading and writing overlap the computation: :meth:`Blocks.prefetch` reads the next block's bytes on a background
thread into the operating system's page cache (not into this process's memory, see :func:`read_ahead`), and a
streamed pass writes each pruned block on a background thread while it works on the next (:func:`write_behind`).
``IO_SECONDS`` counts the seconds of both kinds apart: what the calling thread waited for (``read``, ``write``)
and what ran beside the computation (``read_ahead``, ``write_behind``).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import functools
import json
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._memory import host_buffer
from jaxprune.errors import JaxpruneError
from jaxprune.io._atomic import atomic_file

Block = dict
Loader = Callable[[], Block]

# Seconds spent reading and writing weights in this process (safetensors, checkpoints, resume state): what a
# streamed run reports beside its total, to split it into reading, computing and writing. ``read`` and ``write``:
# seconds the calling thread spent in them (a write includes waiting for a write behind); ``read_ahead`` and
# ``write_behind``: seconds of the background threads, which overlap the rest.
IO_SECONDS = {"read": 0.0, "write": 0.0, "read_ahead": 0.0, "write_behind": 0.0}
_IO_LOCK = threading.Lock()
_BACKGROUND = threading.local()  # ``kind`` set on the threads of read_ahead ("read_ahead") and write_behind
READ_AHEAD_CHUNK = 8 << 20  # bytes per read of read_ahead (its one scratch buffer)


@contextlib.contextmanager
def timed(kind: str):
  """Adds the seconds of the ``with`` body to ``IO_SECONDS[kind]`` (on a background I/O thread, to that thread's
  own kind instead)."""
  kind = getattr(_BACKGROUND, "kind", None) or kind
  start = time.perf_counter()
  try:
    yield
  finally:
    with _IO_LOCK:
      IO_SECONDS[kind] += time.perf_counter() - start


@functools.cache
def _pool(kind: str) -> concurrent.futures.ThreadPoolExecutor:
  """The one background thread of ``kind``: its tasks run one at a time, in the order they were given."""
  return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"jaxprune-{kind}",
                                               initializer=lambda: setattr(_BACKGROUND, "kind", kind))


def read_ahead(ranges: Iterable[tuple[Path, int, int]]) -> None:
  """Starts reading ``ranges`` (``(file, offset, length)``) on a background thread, 8 MiB at a time into one
  scratch buffer that is thrown away: the bytes are then in the operating system's page cache when the pass asks
  for them, and its read copies from memory instead of waiting for the disk. This process holds no more than the
  scratch buffer (the page cache is not its memory). Read errors are ignored here; the real read reports them."""
  _pool("read_ahead").submit(_warm, list(ranges))


def _warm(ranges: list[tuple[Path, int, int]]) -> None:
  scratch = memoryview(bytearray(READ_AHEAD_CHUNK))
  with timed("read_ahead"):
    for file, offset, length in ranges:
      try:
        with open(file, "rb") as f:
          for at in range(offset, offset + length, READ_AHEAD_CHUNK):
            if os.preadv(f.fileno(), [scratch[:min(READ_AHEAD_CHUNK, offset + length - at)]], at) <= 0:
              break
      except OSError:
        continue


def files_of(root: Path) -> list[Path]:
  """The file ``root``, or every file under the directory ``root`` (sorted), or none if ``root`` does not exist."""
  root = Path(root)
  if root.is_file():
    return [root]
  return sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else []


def file_ranges(root: Path) -> list[tuple[Path, int, int]]:
  """The files of :func:`files_of` as whole-file ranges for :func:`read_ahead`."""
  return [(f, 0, f.stat().st_size) for f in files_of(root)]


def write_behind(fn: Callable[[], None]) -> concurrent.futures.Future:
  """Runs ``fn`` (a write) on the background writing thread, after the writes given before it; its ``result()``
  waits for it and raises what it raised."""
  return _pool("write_behind").submit(fn)


class Blocks(Sequence):
  """Decoder blocks, each either held (a dict of arrays) or read when indexed (a zero-argument loader).

  ``abstract(i)`` gives block ``i``'s ``ShapeDtypeStruct`` tree without reading it, when the blocks' source
  knows it (else it reads the block). :meth:`with_block` returns a copy with one entry replaced: a pass
  replaces each block by a loader of where it wrote the pruned block. ``ranges(i)``: the byte ranges
  ``(file, offset, length)`` that entry ``i`` as given reads, for :meth:`prefetch` (a replaced entry gives its
  own, as its ``ranges()`` method if it has one).
  """

  def __init__(self, entries: Sequence[Block | Loader], abstract: Callable[[int], Block] | None = None,
               ranges: Callable[[int], list] | None = None, _replaced: frozenset = frozenset()):
    self._entries = list(entries)
    self._abstract = abstract
    self._ranges = ranges
    self._replaced = _replaced

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    entry = self._entries[i]
    return entry() if callable(entry) else entry

  def entry(self, i: int) -> Block | Loader:
    """Entry ``i`` as given: a block, or its loader (not called)."""
    return self._entries[i]

  def held(self, i: int) -> bool:
    """Whether block ``i`` is in memory (not read from disk when indexed)."""
    return not callable(self._entries[i])

  def abstract(self, i: int) -> Block:
    """Block ``i`` as a tree of ``jax.ShapeDtypeStruct``."""
    if self._abstract is not None and not self.held(i):
      return self._abstract(i)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), self[i])

  def with_block(self, i: int, entry: Block | Loader) -> "Blocks":
    entries = list(self._entries)
    entries[i] = entry
    return Blocks(entries, self._abstract, self._ranges, self._replaced | {i})

  def prefetch(self, i: int) -> None:
    """Starts reading block ``i`` from disk in the background (:func:`read_ahead`), so that indexing it later
    waits less; nothing for a block held in memory or out of range."""
    if not 0 <= i < len(self) or self.held(i):
      return
    entry = self._entries[i]
    if hasattr(entry, "ranges"):
      read_ahead(entry.ranges())
    elif self._ranges is not None and i not in self._replaced:
      read_ahead(self._ranges(i))

  def __repr__(self) -> str:
    held = sum(self.held(i) for i in range(len(self)))
    return f"Blocks({len(self)} blocks, {held} in memory)"


class Lazy:
  """An entry of a streamed model's params besides the blocks (``"embed"``, ``"head"``): ``read()`` returns a
  dict holding it (entries read together share one ``read``, which :func:`split` calls once), ``abstract`` its
  ``ShapeDtypeStruct`` tree."""

  def __init__(self, key: str, read: Callable[[], dict], abstract):
    self.key, self.read, self.abstract = key, read, abstract

  def __repr__(self) -> str:
    return f"Lazy({self.key!r})"


def is_streamed(params) -> bool:
  """Whether ``params["layers"]`` is a :class:`Blocks` (read block by block)."""
  return isinstance(params, dict) and isinstance(params.get("layers"), Blocks)


def split(params: dict, *, read: bool = True) -> tuple[dict, Sequence]:
  """``(params without "layers", the layers)``: the first is an ordinary pytree whatever the layers are, its
  :class:`Lazy` entries read now (each of their reads once), or given as ``ShapeDtypeStruct`` trees when
  ``read`` is false."""
  rest, done = {}, {}
  for k, v in params.items():
    if k == "layers":
      continue
    if isinstance(v, Lazy) and read:
      if id(v.read) not in done:
        done[id(v.read)] = v.read()
      v = done[id(v.read)][v.key]
    rest[k] = v.abstract if isinstance(v, Lazy) else v
  return rest, params["layers"]


def join(rest: dict, layers) -> dict:
  return {**rest, "layers": layers}


def with_layer(layers, i: int, entry):
  """``layers`` with entry ``i`` replaced: a list copy, or :meth:`Blocks.with_block` (no block is read)."""
  if isinstance(layers, Blocks):
    return layers.with_block(i, entry)
  layers = list(layers)
  layers[i] = entry() if callable(entry) else entry
  return layers


def layer_abstract(layers, i: int) -> Block:
  """Block ``i`` of ``layers`` as a ``ShapeDtypeStruct`` tree (not read from disk for :class:`Blocks`)."""
  if isinstance(layers, Blocks):
    return layers.abstract(i)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), layers[i])


def prefetch(layers, i: int) -> None:
  """:meth:`Blocks.prefetch` of block ``i`` when ``layers`` is a :class:`Blocks`; nothing for a list."""
  if isinstance(layers, Blocks):
    layers.prefetch(i)


def materialize(params: dict) -> dict:
  """``params`` with every block in memory (an ordinary pytree)."""
  rest, layers = split(params)
  return join(rest, [layers[i] for i in range(len(layers))] if isinstance(layers, Blocks) else layers)


def streamed_params(get: Callable[[str], np.ndarray], names, config, dtype, source,
                    where: Callable[[str], tuple[Path, int, int]] | None = None,
                    get_transient: Callable[[str], np.ndarray] | None = None) -> dict:
  """Params whose embeddings and head are :class:`Lazy` and whose blocks are a :class:`Blocks`, read when used, from a
  Hugging Face state dict given tensor by tensor (``get(name)``, ``names``; see
  :func:`~jaxprune.models._convert.tree_from_hf`), in ``dtype``. Missing tensors are named now; a block that does
  not fit ``dtype`` (float16 infinities) fails when it is read. ``source`` names the model in errors.
  ``where(name)``: the byte range ``(file, offset, length)`` of a tensor, for :meth:`Blocks.prefetch`;
  ``get_transient``: see :func:`~jaxprune.models._convert.tree_from_hf`; used for the blocks only, and its buffer
  released after each block (:func:`release_transient`)."""
  from jaxprune import _tree as tree
  from jaxprune.models._convert import hf_name, tree_from_hf
  from jaxprune.models._model import abstract_params

  abstract = abstract_params(config, dtype)
  missing = [hf_name(config, ("layers", str(i)) + p) for i in range(config.num_layers)
             for p, _ in tree.items(abstract["layers"][i])]
  missing += [hf_name(config, (k,) + p) for k, v in abstract.items() if k != "layers" for p, _ in tree.items(v)]
  missing = [n for n in missing if n not in names]
  if missing:
    raise JaxpruneError(f"checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
  def read_rest() -> dict:
    return {k: tree_from_hf(get, names, config, v, prefix=(k,), dtype=dtype) for k, v in abstract.items()
            if k != "layers"}

  rest = {k: Lazy(k, read_rest, v) for k, v in abstract.items() if k != "layers"}

  def read(i: int) -> Block:
    with np.errstate(over="ignore"):
      try:
        block = tree_from_hf(get, names, config, abstract["layers"][i], prefix=("layers", str(i)), dtype=dtype,
                             get_transient=get_transient)
      finally:
        release_transient()
    if dtype == jnp.float16 and not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(block)):
      raise JaxpruneError(f"{source} cannot be held in float16: block {i} has weights beyond its range (±65504) "
                          "that become infinite; use bfloat16 or float32")
    return block

  def ranges(i: int) -> list:
    block_names = (hf_name(config, ("layers", str(i)) + p) for p, _ in tree.items(abstract["layers"][i]))
    return [where(name) for name in block_names if name in names]

  return join(rest, Blocks([functools.partial(read, i) for i in range(config.num_layers)],
                           abstract=lambda i: abstract["layers"][i], ranges=ranges if where else None))


# ---------------------------------------------------------------------------------------------- safetensors

_SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(jnp.bfloat16),
                       "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
                       "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8)}


class SafetensorsFiles:
  """The tensors of one or more ``.safetensors`` files, each read by byte range on request.

  ``dtypes``: ``{name: safetensors dtype string}``; ``get(name)`` returns a fresh array (no memory map). A file
  shorter than its header says, or a header that is not valid, gives a one-line :class:`JaxpruneError` naming
  the file, also when met halfway through reading.
  """

  def __init__(self, files: Sequence[Path]):
    self._where: dict[str, tuple[Path, dict, int]] = {}
    self.dtypes: dict[str, str] = {}
    for file in files:
      header, start = _header(Path(file))
      for name, info in header.items():
        if name == "__metadata__":
          continue
        self._where[name] = (Path(file), info, start)
        self.dtypes[name] = info["dtype"]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name][1]["shape"])

  def where(self, name: str) -> tuple[Path, int, int]:
    """``(file, offset, length)`` of tensor ``name``'s bytes."""
    file, info, start = self._where[name]
    begin, end = info["data_offsets"]
    return file, start + begin, end - begin

  def get(self, name: str) -> np.ndarray:
    """Tensor ``name`` in a new array (a :func:`~jaxprune._memory.host_buffer`)."""
    return self._read(name, host_buffer)

  def get_transient(self, name: str) -> np.ndarray:
    """Tensor ``name`` in this thread's read buffer, which the thread's next call overwrites, until
    :func:`release_transient`: for a caller that copies the tensor out converted (a layout or a dtype), so that
    the reads of a block land in memory written before instead of memory new to the process
    (:func:`~jaxprune._memory.host_buffer`)."""
    return self._read(name, _scratch)

  def _read(self, name: str, buffer: Callable[[int], np.ndarray]) -> np.ndarray:
    file, info, start = self._where[name]
    begin, end = info["data_offsets"]
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
      raise JaxpruneError(f"{file}: tensor {name} has dtype {info['dtype']}, which jaxprune cannot read")
    out = buffer(end - begin)
    with timed("read"), open(file, "rb") as f:
      got = os.preadv(f.fileno(), [memoryview(out)], start + begin)
    if got != end - begin:
      raise JaxpruneError(f"{file} is not a readable weight file (truncated or damaged?): tensor {name} ends at "
                          f"byte {start + end}, the file has {os.path.getsize(file)}")
    return out.view(dtype).reshape(info["shape"])


_SCRATCH = threading.local()  # SafetensorsFiles.get_transient's buffer, one per thread


def _scratch(nbytes: int) -> np.ndarray:
  """The first ``nbytes`` of this thread's read buffer, made larger (the old one freed first) if it is short."""
  if getattr(_SCRATCH, "buffer", None) is None or _SCRATCH.buffer.nbytes < nbytes:
    _SCRATCH.buffer = None
    _SCRATCH.buffer = host_buffer(nbytes)
  return _SCRATCH.buffer[:nbytes]


def release_transient() -> None:
  """Frees this thread's :meth:`SafetensorsFiles.get_transient` buffer (the size of a block's largest linear), so
  that a pass does not hold it through the block's solvers: a streamed pass reuses it within a block's reads."""
  _SCRATCH.buffer = None


_SAFETENSORS_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}
DIRECT_ALIGN = 4096  # offsets and lengths of direct writes are multiples of it (any disk's logical block size)
WRITE_CHUNK = 16 << 20  # bytes per write of write_safetensors (its one aligned staging buffer per thread)
_STAGING = threading.local()


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes ``tensors`` as one safetensors file at ``path`` (atomically: a temporary sibling, then a rename).

  The file goes to disk with **direct I/O** (``O_DIRECT``) where the file system allows it: the bytes are copied
  16 MiB at a time into one page-aligned staging buffer and written from there, bypassing the page cache, then
  the file is cut to its size and synced. On the 2-core VM of ``experiments/scale`` a 7B block written so takes
  about what ``dd oflag=direct`` takes for as many bytes, where a write through the page cache (Orbax, NumPy, or
  ``dd conv=fsync``) takes several times longer. Where direct I/O is refused (tmpfs, some network file systems)
  the same bytes are written through the page cache. The header is padded with spaces, as the format allows,
  so that the tensors' data starts at a multiple of 4096 bytes.
  """
  header = {"__metadata__": dict(metadata)} if metadata else {}
  pieces, offset = [], 0
  for name, array in tensors.items():
    array = np.asarray(array, order="C")  # (np.ascontiguousarray would make a scalar one-dimensional)
    code = _SAFETENSORS_CODES.get(array.dtype)
    if code is None:
      raise JaxpruneError(f"cannot write tensor {name} of dtype {array.dtype} as safetensors")
    header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
    pieces.append(array.reshape(-1).view(np.uint8))
    offset += array.nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-(8 + len(text)) % DIRECT_ALIGN)
  pieces.insert(0, np.frombuffer(struct.pack("<Q", len(text)) + text, np.uint8))
  with timed("write"), atomic_file(path) as tmp:
    try:
      _write_pieces(tmp, pieces, direct=hasattr(os, "O_DIRECT"))
    except OSError as err:
      if err.errno != errno.EINVAL:
        raise
      _write_pieces(tmp, pieces, direct=False)  # direct I/O refused by this file system


def _write_pieces(path: Path, pieces: list[np.ndarray], direct: bool) -> None:
  """The concatenation of ``pieces`` (uint8 arrays) into a new file at ``path``, synced to disk: with direct I/O
  through an aligned staging buffer, or else in plain writes."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
  try:
    if not direct:
      for piece in pieces:
        view = memoryview(piece)
        while view.nbytes:
          view = view[os.write(fd, view):]
    else:
      staging = _staging()
      filled, at = 0, 0
      for piece in pieces:
        start = 0
        while start < piece.size:
          n = min(WRITE_CHUNK - filled, piece.size - start)
          staging[filled:filled + n] = piece[start:start + n].data
          filled, start = filled + n, start + n
          if filled == WRITE_CHUNK:
            at += _pwrite_all(fd, staging, WRITE_CHUNK, at)
            filled = 0
      if filled:
        padded = -(-filled // DIRECT_ALIGN) * DIRECT_ALIGN
        staging[filled:padded] = bytes(padded - filled)
        _pwrite_all(fd, staging, padded, at)
        os.ftruncate(fd, at + filled)
    os.fsync(fd)
  finally:
    os.close(fd)


def _staging() -> mmap.mmap:
  """This thread's page-aligned staging buffer of ``WRITE_CHUNK`` bytes (as direct I/O requires), kept for its next
  write: memory written for the first time is slow on some virtual machines (see :mod:`jaxprune._memory`)."""
  buffer = getattr(_STAGING, "buffer", None)
  if buffer is None or len(buffer) != WRITE_CHUNK:
    buffer = _STAGING.buffer = mmap.mmap(-1, WRITE_CHUNK)
  return buffer


def _pwrite_all(fd: int, buffer: mmap.mmap, length: int, at: int) -> int:
  view = memoryview(buffer)[:length]
  while view.nbytes:
    done = os.pwrite(fd, view, at + length - view.nbytes)
    view = view[done:]
  return length


def _header(file: Path) -> tuple[dict, int]:
  """The JSON header of a safetensors file and the offset where its data begins."""
  try:
    with open(file, "rb") as f:
      (length,) = struct.unpack("<Q", f.read(8))
      if length > 100_000_000:
        raise ValueError(f"header length {length} is not plausible")
      header = json.loads(f.read(length))
    if not isinstance(header, dict):
      raise ValueError("header is not a JSON object")
    for name, info in header.items():
      if name != "__metadata__" and not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"tensor {name} lacks dtype, shape or data_offsets")
  except (OSError, ValueError, struct.error) as err:
    raise JaxpruneError(f"{file} is not a readable weight file (truncated or damaged?): {err}") from None
  return header, 8 + length
