"""Host memory that a pass frees and asks for again is kept by the process, not handed back to the system.

A pass allocates the same large host buffers block after block: the activations of each batch (on a CPU, every
program's outputs are host memory), the next block's weights as read from disk, their converted and placed copies,
the pruned weights fetched back, solver temporaries. By default glibc's ``malloc`` gives every buffer above its
threshold (up to 32 MiB) its own memory map and returns it to the system when it is freed, and hands the free top
of its heap back too, so each block writes to memory it has just got from the system. On a virtual machine whose
guest reports freed pages to its host (free page reporting), such memory is slow to write the first time: copying a
7B block (0.4 GB) from the page cache into new NumPy buffers ran at 0.45-0.76 GB/s, into new buffers of
:func:`host_buffer` at 1.17-1.36 GB/s, and into buffers kept from the block before at 4.4-6.4 GB/s (2-core VM,
2026-12-04; ``experiments/scale/fresh_memory.py``). Streamed reads use :func:`host_buffer` and read a block's
linear weights through one buffer (``jaxprune.io._stream``) whatever the setting below.

Inside :func:`retained_memory`, ``malloc`` (glibc only) serves large requests from its heap and keeps what is freed
there for the next request; at the end of the outermost one it hands the free memory back (``malloc_trim``), so
that a notebook does not keep the pass's peak after it, and takes glibc's default settings again (a memory map for
each large buffer, the heap's free top handed back), except that it no longer adjusts its threshold by itself.
The pass asks for it when its model is in memory. On the 2-core VM (2026-12-05; SmolLM2-135M, its first 12 blocks,
Wanda 50 %, each run in a fresh process, two runs each; ``python experiments/prune_speed/retain_memory.py``), the
true-sequential pass took 24.0 s against 24.8-25.3 s without it, the default order's 37.3-37.4 s against
37.1-39.4 s, with half the page faults or fewer and peaks 0.04-0.4 GB higher. A streamed
pass does not ask for it: there the price is the peak, since freed buffers of one size do not always serve requests
of another, and the streamed 7B steps of ``experiments/scale`` peaked 0.6-1.1 GB higher (SparseGPT on two blocks:
4.91 GB against 3.77 GB). ``JAXPRUNE_RETAIN_MEMORY=1`` in the environment keeps memory in every pass, ``=0`` in
none.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import platform
import threading

import numpy as np

ENV = "JAXPRUNE_RETAIN_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_KEEP = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}  # no maps; the free top of the heap stays
_GLIBC_DEFAULTS = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024}  # DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD
_DEPTH = [0]  # retaining withs entered and not left
_LOCK = threading.Lock()


@functools.cache
def _libc():
  """glibc, or None (another C library)."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    return ctypes.CDLL("libc.so.6")
  except OSError:
    return None


def retains(*, by_default: bool = False) -> bool:
  """Whether ``retained_memory(by_default=by_default)`` keeps freed memory in this process: ``JAXPRUNE_RETAIN_MEMORY``
  is ``1``, or unset (or empty) and ``by_default``; and the C library is glibc."""
  setting = os.environ.get(ENV, "").strip()
  return (setting == "1" or (not setting and by_default)) and _libc() is not None


def _mallopt(libc, settings: dict) -> bool:
  """Applies every one of ``settings`` (``mallopt`` parameter -> value); whether all were accepted."""
  return all([libc.mallopt(param, value) for param, value in settings.items()])  # a list: none skipped


@contextlib.contextmanager
def retained_memory(*, by_default: bool = False):
  """Freed host memory kept for reuse inside the ``with`` where :func:`retains` says so (see the module), and the
  free part handed back to the system, with ``malloc``'s defaults, when the outermost such ``with`` ends;
  otherwise nothing."""
  libc = _libc() if retains(by_default=by_default) else None
  if libc is not None:
    with _LOCK:
      if _DEPTH[0] == 0 and not _mallopt(libc, _KEEP):  # refused: malloc's defaults, nothing kept
        _mallopt(libc, _GLIBC_DEFAULTS)
        libc = None
      else:
        _DEPTH[0] += 1
  try:
    yield
  finally:
    if libc is not None:
      with _LOCK:
        _DEPTH[0] -= 1
        if _DEPTH[0] == 0:
          libc.malloc_trim(0)
          _mallopt(libc, _GLIBC_DEFAULTS)


MAPPED_BYTES = 4 << 20  # buffers from this size up get their own memory map (NumPy asks huge pages from 4 MiB)


def host_buffer(nbytes: int) -> np.ndarray:
  """A new ``uint8`` array of ``nbytes`` for weights read from disk or converted, in its own anonymous memory map
  from :data:`MAPPED_BYTES` up (released when the last array using it is freed), else from ``np.empty``.

  NumPy asks the kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``) for every array from 4 MiB up.
  Where the kernel's huge-page ``defrag`` setting is ``madvise`` (the default of the common distributions), each
  such page is assembled on first touch, compacting memory if need be: with a 7B model's files in the page cache,
  reading a block (0.4 GB, ``preadv``) into new NumPy buffers ran at 0.45-0.76 GB/s against 1.17-1.36 GB/s into
  buffers of this function (2-core VM, 2026-12-04; ``experiments/scale/fresh_memory.py``). A weight is read once
  and used for a block's matrix products, which gain little from huge pages on the host."""
  if nbytes < MAPPED_BYTES:
    return np.empty(nbytes, np.uint8)
  return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)


def host_empty(shape, dtype) -> np.ndarray:
  """An uninitialised array of ``shape`` and ``dtype`` in a :func:`host_buffer`."""
  dtype = np.dtype(dtype)
  return host_buffer(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize).view(dtype).reshape(shape)
