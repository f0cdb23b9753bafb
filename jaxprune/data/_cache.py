"""On-disk cache of tokenized texts, keyed by the text's sha256 and the tokenizer's identity.

Tokenizing the bundled corpora (~1M tokens) takes several seconds; the cache makes the second run instant.
Location: ``$JAXPRUNE_CACHE/tokens/`` if ``JAXPRUNE_CACHE`` is set, else ``~/.cache/jaxprune/tokens/``.
Files are written atomically (temporary file + rename), so concurrent runs never read a partial file.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from jaxprune.io._atomic import atomic_write

FORMAT = "v1"  # bump when the tokenization convention changes


def cache_dir() -> Path:
  """The token cache directory (not created here)."""
  root = os.environ.get("JAXPRUNE_CACHE")
  base = Path(root).expanduser() if root else Path.home() / ".cache" / "jaxprune"
  return base / "tokens"


def tokenizer_fingerprint(tokenizer) -> str:
  """A sha256 identifying what ``tokenizer`` does: its serialized fast tokenizer when it has one.

  Falls back to class, ``name_or_path`` and vocabulary size for tokenizers without a Rust backend.
  """
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None and hasattr(backend, "to_str"):
    ident = backend.to_str()
  else:
    ident = f"{type(tokenizer).__qualname__}|{getattr(tokenizer, 'name_or_path', '')}|{_vocab_len(tokenizer)}"
  return hashlib.sha256(ident.encode("utf-8")).hexdigest()


def _vocab_len(tokenizer) -> int | str:
  try:
    return len(tokenizer)
  except TypeError:
    return getattr(tokenizer, "vocab_size", "?")


def cache_path(text_sha: str, tokenizer_sha: str) -> Path:
  return cache_dir() / f"{text_sha[:24]}-{tokenizer_sha[:24]}-{FORMAT}.npy"


def load_cached(path: Path) -> np.ndarray | None:
  """The cached 1-D int32 token array, or None when absent or unreadable (it is then rebuilt)."""
  try:
    tokens = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError):
    return None
  if tokens.ndim != 1 or tokens.dtype != np.int32:
    return None
  return tokens


def store(path: Path, tokens: np.ndarray) -> None:
  """Writes ``tokens`` to ``path`` atomically; a cache that cannot be written is silently skipped."""
  try:
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(tokens, dtype=np.int32), allow_pickle=False))
  except OSError:
    pass
