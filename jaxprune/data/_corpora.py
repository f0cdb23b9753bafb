"""Text sources: corpora bundled with jaxprune (xz-compressed, read offline) and UTF-8 text files.

Bundled corpora (sources and licences in ``jaxprune/data/texts/LICENSES.md``):

- ``wiki``: ~100 English Wikipedia articles, WikiText-style headings (CC BY-SA); the default calibration text.
- ``austen``: Jane Austen's six novels (public domain); the default evaluation text.
- ``mobydick``: Herman Melville's *Moby Dick* (public domain).
"""
from __future__ import annotations

import hashlib
import importlib.resources
import lzma
import os
from pathlib import Path

from jaxprune.errors import JaxpruneError

BUNDLED = ("wiki", "austen", "mobydick")
HUB = ("wikitext2", "c4", "ptb")


def is_bundled(source: str) -> bool:
  """Whether ``source`` names a bundled corpus (names take precedence over files: use ``./wiki`` for a file)."""
  return source in BUNDLED


def is_hub(source: str) -> bool:
  """Whether ``source`` names a Hugging Face dataset that needs network access."""
  return source in HUB


def _read_bundled(name: str) -> str:
  resource = importlib.resources.files("jaxprune.data").joinpath("texts", f"{name}.txt.xz")
  if not resource.is_file():
    raise JaxpruneError(f"bundled corpus {name!r} is missing from this installation "
                        f"(regenerate it with scripts/make_corpora.py)")
  return lzma.decompress(resource.read_bytes()).decode("utf-8")


def _read_file(source: str) -> str:
  path = Path(os.path.expanduser(source))
  if path.is_dir():
    raise JaxpruneError(f"{source} is a directory, expected a UTF-8 text file")
  if not path.is_file():
    raise JaxpruneError(f"no such file: {source} (known corpora: {', '.join(BUNDLED)}; "
                        f"hub datasets: {', '.join(HUB)})")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as err:
    raise JaxpruneError(f"{source} is not UTF-8 text (byte {err.start}: {err.reason})") from None
  except OSError as err:
    raise JaxpruneError(f"cannot read {source}: {err.strerror}") from None
  if not text.strip():
    raise JaxpruneError(f"{source} is empty")
  return text


def _looks_like_path(source: str) -> bool:
  return os.sep in source or "/" in source or "." in Path(source).name or source.startswith("~")


def load_text(source: str) -> str:
  """The text of a bundled corpus (``wiki``, ``austen``, ``mobydick``) or of a UTF-8 text file.

  Args:
    source: a bundled corpus name or a path. A bare word that is neither a bundled name nor an existing
      file is reported as an unknown corpus.

  Returns:
    The whole text, decoded from UTF-8.

  Raises:
    JaxpruneError: unknown corpus name, missing path, directory, non-UTF-8 or empty file, or a hub dataset
      name (those are fetched by :func:`jaxprune.data.load_windows`).

  >>> load_text("austen")[:21]
  'SENSE AND SENSIBILITY'
  """
  source = str(source)
  if is_bundled(source):
    return _read_bundled(source)
  if is_hub(source):
    raise JaxpruneError(f"{source!r} is a Hugging Face dataset: load it with load_windows (needs network)")
  if not source:
    raise JaxpruneError("empty text source: give a corpus name or a file path")
  if not _looks_like_path(source) and not os.path.exists(source):
    raise JaxpruneError(f"unknown corpus {source!r}: expected one of {', '.join(BUNDLED)}, "
                        f"a hub dataset ({', '.join(HUB)}), or a path to a text or .npy file")
  return _read_file(source)


def text_sha256(text: str) -> str:
  """sha256 of the UTF-8 bytes of ``text`` (hex)."""
  return hashlib.sha256(text.encode("utf-8")).hexdigest()
