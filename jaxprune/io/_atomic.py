"""Crash-safe writes: a file or a whole directory appears under its final name complete, or not at all.

Both write into a temporary sibling (a name starting with ``.``, in the same directory, so the final
``os.replace``/``rename`` stays on one file system) and rename it into place. What they leave behind has the
permissions an ordinary ``open``/``mkdir`` would give under the process umask (files ``0644``, directories
``0755`` under the usual ``022``), whatever mode the writer used for its own temporary files.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
  """The process umask, read without changing it (Linux), else by setting and restoring it."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _sibling(path: Path, tag: str) -> Path:
  return path.with_name(f".{path.name}.{tag}-{secrets.token_hex(4)}")


def _fix_modes(root: Path) -> None:
  """Sets ordinary permissions on ``root`` and everything under it (some writers create ``0600`` files)."""
  umask = _umask()
  file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
  if root.is_file():
    root.chmod(file_mode)
    return
  root.chmod(dir_mode)
  for parent, dirs, files in os.walk(root):
    for name in dirs:
      Path(parent, name).chmod(dir_mode)
    for name in files:
      Path(parent, name).chmod(file_mode)


def atomic_write(path: Path | str, content: bytes | str | Callable[[BinaryIO], object]) -> Path:
  """Writes ``content`` to ``path`` through a temporary sibling file and an atomic rename.

  Args:
    path: the file to create or replace; its parent directory is created if missing.
    content: bytes, text (written as UTF-8), or a function that writes to the open binary file it is given.

  Returns:
    ``path``. On any error the temporary file is removed and ``path`` is left as it was.
  """
  with atomic_file(path) as tmp, open(tmp, "xb") as f:
    if callable(content):
      content(f)
    else:
      f.write(content.encode("utf-8") if isinstance(content, str) else content)
  return Path(path)


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
  """Yields the name of a temporary sibling file (not yet created) that becomes ``path`` when the ``with`` block
  ends without error, for writers that open the file themselves; on an error it is removed and ``path`` is left as
  it was. The parent directory is created if missing."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _sibling(path, "tmp")
  try:
    yield tmp
    _fix_modes(tmp)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


@contextlib.contextmanager
def atomic_dir(path: Path | str, *, replace: bool = False) -> Iterator[Path]:
  """Yields an empty temporary directory that becomes ``path`` when the ``with`` block ends without error.

  Args:
    path: the directory to create. If it exists it must be empty, unless ``replace``: then it is swapped out
      (renamed aside, the new one renamed in, the old one deleted), so the name always holds a complete directory.
    replace: allow replacing an existing ``path``. The caller decides what may be replaced.

  On an error inside the block the temporary directory is deleted and ``path`` is untouched.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _sibling(path, "tmp")
  tmp.mkdir()
  try:
    yield tmp
    _fix_modes(tmp)
    if path.exists() and (replace or (path.is_dir() and not any(path.iterdir()))):
      old = _sibling(path, "old")
      path.rename(old)
      try:
        tmp.rename(path)
      except BaseException:
        old.rename(path)
        raise
      shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
      tmp.rename(path)  # fails if path appeared meanwhile and is a non-empty directory or a file
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
