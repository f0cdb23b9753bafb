"""Freed host memory is kept for reuse during a pass (glibc) where asked for, and handed back, with malloc's
defaults, when the pass ends."""
import os
import platform
import subprocess
import sys

import pytest

from jaxprune import _memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Run in a fresh process: malloc's setting lasts as long as the process.
REUSE = """
import ctypes, os, resource, sys, numpy as np
from jaxprune import _memory

if sys.platform == "linux":
  ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: one fault per 4 KiB page, countable

def rss():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def faults_touching(nbytes):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  a = np.empty(nbytes, np.uint8)
  a[::4096] = 1
  del a
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

nbytes = 64 << 20  # above glibc's largest mmap threshold (32 MiB): by default a fresh map each time
by_default = sys.argv[1] == "True"
with _memory.retained_memory(by_default=by_default):
  with _memory.retained_memory(by_default=by_default):  # nested, as a pass inside a command's
    faults_touching(nbytes)
    again = faults_touching(nbytes)
  inner_left = faults_touching(nbytes)  # the outer with still keeps it
  a = np.ones(nbytes, np.uint8)
  del a
  held = rss()
faults_touching(nbytes)
after = faults_touching(nbytes)
print(_memory.retains(by_default=by_default), again, inner_left, nbytes // 4096, held - rss(), after)
"""


def _run(env_value: str | None, by_default: bool) -> list[str]:
  env = {k: v for k, v in os.environ.items() if k != _memory.ENV}
  if env_value is not None:
    env[_memory.ENV] = env_value
  return subprocess.run([sys.executable, "-c", REUSE, str(by_default)], env=env, capture_output=True, text=True,
                        check=True).stdout.split()


@pytest.mark.skipif(not GLIBC, reason="malloc is set on glibc only")
@pytest.mark.parametrize("env_value, by_default", [("1", False), (None, True), ("", True)])
def test_freed_memory_is_reused_inside_and_handed_back_after(env_value, by_default):
  retains, again, inner_left, pages, returned, after = _run(env_value, by_default)
  assert retains == "True"
  assert int(again) < int(pages) // 10  # the same memory again, not fresh pages
  assert int(inner_left) < int(pages) // 10
  assert int(returned) > (64 << 20) // 2  # handed back at the end of the outermost with
  assert int(after) > int(pages) // 2  # malloc's defaults again: a fresh map for each large buffer


@pytest.mark.parametrize("env_value, by_default", [(None, False), ("0", False), ("0", True)])
def test_otherwise_malloc_is_left_alone(env_value, by_default):
  retains, again, _, pages, _, _ = _run(env_value, by_default)
  assert retains == "False"
  if GLIBC:
    assert int(again) > int(pages) // 2  # glibc maps a fresh region each time: what the setting is for


def test_host_buffer_maps_large_buffers_apart_and_leaves_small_ones_to_numpy():
  import mmap

  import numpy as np

  def mapped(a):
    return isinstance(getattr(a.base, "obj", None), mmap.mmap)

  large = _memory.host_buffer(_memory.MAPPED_BYTES)
  assert mapped(large) and large.nbytes == _memory.MAPPED_BYTES and large.flags.writeable
  large[-1] = 7
  assert large[-1] == 7
  small = _memory.host_buffer(_memory.MAPPED_BYTES - 1)
  assert not mapped(small) and small.nbytes == _memory.MAPPED_BYTES - 1
  shaped = _memory.host_empty((1024, 1025), np.float32)
  assert shaped.shape == (1024, 1025) and shaped.dtype == np.float32 and shaped.flags.c_contiguous
