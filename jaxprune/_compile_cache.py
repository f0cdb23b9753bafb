"""A persistent XLA compilation cache for the command line: later runs on the same shapes skip compilation.

Every ``jaxprune`` command turns JAX's persistent compilation cache on before any computation, in
``$XDG_CACHE_HOME/jaxprune/xla`` (``~/.cache/jaxprune/xla`` by default), for every program (no minimum compile time).
A pass compiles the block forward, the statistics and each solver once per shape: on the 2-core development VM,
SparseGPT's pass on the embedded model (16 × 512 calibration tokens) took 40.9 s with its programs in the cache
against 49.1-49.7 s without (``python experiments/prune_speed/compile_cache.py``); on a GPU compiling costs more,
since XLA autotunes the model's matrix products there.

The cache is kept under :data:`MAX_BYTES` by evicting the least recently used programs (JAX's own eviction, which
locks the folder with the ``filelock`` package, a dependency of ``transformers``; without it the size is not
bounded). ``JAXPRUNE_COMPILATION_CACHE`` in the environment: ``0`` (or ``off``, ``false``, ``no``) turns it off, a
path puts it there. A cache the user set up for JAX itself (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is
left as it is. Library code is not affected unless it calls :func:`use_compilation_cache`
(``jaxprune.use_compilation_cache()``, e.g. at the top of a notebook).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import jax

ENV = "JAXPRUNE_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no")
MAX_BYTES = 4 * 2**30
"""The cache's size bound (unless ``JAX_COMPILATION_CACHE_MAX_SIZE`` is set)."""


def _asked() -> str | None:
  """``$JAXPRUNE_COMPILATION_CACHE`` stripped (``""`` when unset), or ``None`` when it turns the cache off."""
  setting = os.environ.get(ENV, "").strip()
  return None if setting.lower() in _OFF else setting


def default_dir() -> Path:
  """``$XDG_CACHE_HOME/jaxprune/xla``, or ``~/.cache/jaxprune/xla``."""
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxprune" / "xla"


def use_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
  """Turns JAX's persistent compilation cache on, in ``path`` (else ``$JAXPRUNE_COMPILATION_CACHE``, else
  :func:`default_dir`), for programs of any compile time; call it before the first computation.

  Returns the cache folder, or ``None`` when ``$JAXPRUNE_COMPILATION_CACHE`` turns it off or the folder cannot be
  created or written (the commands then compile as without it). A cache folder already configured for JAX is kept
  and returned.
  """
  setting = _asked()
  if path is None and setting is None:
    return None
  if jax.config.jax_compilation_cache_dir:
    return Path(jax.config.jax_compilation_cache_dir)
  folder = Path(path or setting or default_dir()).expanduser()
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError:
    return None
  if not os.access(folder, os.W_OK | os.X_OK):
    return None
  jax.config.update("jax_compilation_cache_dir", str(folder))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and importlib.util.find_spec("filelock") is not None:
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return folder


def command_line_cache() -> Path | None:
  """:func:`use_compilation_cache` for a command; a folder named in ``$JAXPRUNE_COMPILATION_CACHE`` that cannot be
  used is reported in one line on stderr (the command goes on without the cache)."""
  folder = use_compilation_cache()
  asked = _asked()
  if folder is None and asked:
    print(f"jaxprune: compilation cache off: cannot create or write {asked} (${ENV})", file=sys.stderr)
  return folder
