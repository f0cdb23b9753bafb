"""Opt-in: host memory that a pass frees and asks for again is kept by the process, not handed back to the system.

A pass allocates the same large host buffers block after block: the next block's weights as read from disk,
their converted and placed copies, the pruned weights fetched back, solver temporaries. By default glibc's
``malloc`` gives every buffer above 32 MiB its own memory map and returns it to the system when it is freed, so
each block writes to memory it has just got from the system. On a virtual machine whose guest reports freed pages
to its host (free page reporting), such memory is slow to write the first time: copying a 7B block (0.4 GB) from
the page cache into fresh buffers ran at 0.09-0.14 GB/s, and into buffers kept from the block before at
2.7-6.5 GB/s, faster than the disk (2-core VM, 2026-12-03; ``experiments/scale/fresh_memory.py``).

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
import os
import platform
import threading

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
