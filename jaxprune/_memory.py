"""Opt-in: host memory that a pass frees and asks for again is kept by the process, not handed back to the system.

A pass allocates the same large host buffers block after block: the next block's weights as read from disk,
their converted and placed copies, the pruned weights fetched back, solver temporaries. By default glibc's
``malloc`` gives every buffer above 32 MiB its own memory map and returns it to the system when it is freed, so
each block writes to memory it has just got from the system. On a virtual machine whose guest reports freed pages
to its host (free page reporting), such memory is slow to write the first time: copying a 7B block (0.4 GB) from
the page cache into new NumPy buffers ran at 0.45-0.76 GB/s, into new buffers of :func:`host_buffer` at
1.17-1.36 GB/s, and into buffers kept from the block before at 4.4-6.4 GB/s (2-core VM, 2026-12-04;
``experiments/scale/fresh_memory.py``). Streamed reads use :func:`host_buffer` and read a block's linear weights
through one buffer (``jaxprune.io._stream``) whatever this setting.

With ``JAXPRUNE_RETAIN_MEMORY=1`` in the environment, :func:`retained_memory` sets ``malloc`` (glibc only, once
per process) to serve large requests from its heap and to keep what is freed there for the next request, and at
the end of the outermost ``with`` hands the free memory back (``malloc_trim``), so that a notebook does not keep
the pass's peak after it. The price is the peak: freed buffers of one size do not always serve requests of
another, and the streamed 7B steps of ``experiments/scale`` peaked 0.6-1.1 GB higher (SparseGPT on two blocks:
4.91 GB against 3.77 GB). Without the variable (the default), ``malloc`` is left as it is.
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
_TRIM_THRESHOLD = 2**31 - 1  # the largest an int holds: free memory at the top of the heap stays
_DEPTH = [0]
_LOCK = threading.Lock()


@functools.cache
def _libc():
  """glibc with ``malloc`` set to keep freed memory, or None (another C library, or the setting refused)."""
  if os.environ.get(ENV, "0") != "1" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return None
  if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)):
    return None
  return libc


def retains() -> bool:
  """Whether :func:`retained_memory` keeps freed memory in this process (asked for in the environment, and glibc;
  ``malloc`` is set on first use)."""
  return _libc() is not None


@contextlib.contextmanager
def retained_memory():
  """With ``JAXPRUNE_RETAIN_MEMORY=1`` (see the module), freed host memory is kept for reuse inside the ``with``
  and the free part handed back to the system when the outermost one ends; otherwise nothing."""
  libc = _libc()
  with _LOCK:
    _DEPTH[0] += 1
  try:
    yield
  finally:
    with _LOCK:
      _DEPTH[0] -= 1
      last = _DEPTH[0] == 0
    if last and libc is not None:
      libc.malloc_trim(0)


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
