"""Freed host memory is kept for reuse during a pass (glibc), and handed back when the pass ends."""
import os
import platform
import resource
import subprocess
import sys

import numpy as np
import pytest

from jaxprune import _memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _faults_touching(nbytes: int) -> int:
  """Minor page faults of allocating ``nbytes`` and writing every page of it."""
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  a = np.empty(nbytes, np.uint8)
  a[::4096] = 1
  del a
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not GLIBC, reason="malloc is set on glibc only")
def test_freed_memory_is_reused_inside_and_handed_back_after():
  nbytes = 64 << 20  # above glibc's largest mmap threshold (32 MiB): by default a fresh map each time
  pages = nbytes // 4096
  with _memory.retained_memory():
    assert _memory.retains()
    _faults_touching(nbytes)
    assert _faults_touching(nbytes) < pages // 10  # the same memory again, not fresh pages
  with _memory.retained_memory():
    a = np.ones(nbytes, np.uint8)
    del a
    held = _rss()
  assert _rss() < held - nbytes // 2  # handed back at the end of the outermost with


def test_environment_leaves_malloc_alone():
  code = "from jaxprune import _memory; print(_memory.retains())"
  out = subprocess.run([sys.executable, "-c", code], env={**os.environ, _memory.ENV: "0"}, capture_output=True,
                       text=True, check=True).stdout
  assert out.strip() == "False"
