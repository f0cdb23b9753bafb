"""Cutting a token stream into fixed-length windows: the evaluation and calibration conventions of the papers.

- Evaluation (SparseGPT, Wanda, ADMM, ...): ``n = numel // seqlen`` non-overlapping windows from the start,
  the remainder dropped.
- Calibration (SparseGPT, Wanda): ``nsamples`` windows at random starts drawn with Python's ``random``:
  ``rng = random.Random(seed)``; per sample ``i = rng.randint(0, N - seqlen - 1)``; window ``tokens[i:i+seqlen]``.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np

from jaxprune.errors import JaxpruneError


def _stream(tokens) -> np.ndarray:
  """``tokens`` as a 1-D integer array (no copy when already one)."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise JaxpruneError(f"expected a 1-D token stream, got shape {tokens.shape}")
  if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
    raise JaxpruneError(f"token ids must be integers, got dtype {tokens.dtype}")
  return tokens


def _positive(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise JaxpruneError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def eval_windows(tokens, seqlen: int, max_windows: int | None = None) -> np.ndarray:
  """Non-overlapping evaluation windows: ``n = numel // seqlen``, remainder dropped, the first ``max_windows``.

  Args:
    tokens: int ``[numel]``, the tokenized text.
    seqlen: window length.
    max_windows: keep only the first this many windows (all when None).

  Returns:
    int32 ``[n, seqlen]`` with ``n = min(numel // seqlen, max_windows)``.

  >>> eval_windows(np.arange(7), 3)
  array([[0, 1, 2],
         [3, 4, 5]], dtype=int32)
  """
  tokens = _stream(tokens)
  seqlen = _positive("seqlen", seqlen)
  n = tokens.size // seqlen
  if n == 0:
    raise JaxpruneError(f"text has {tokens.size} tokens, fewer than one window of seqlen {seqlen}")
  if max_windows is not None:
    n = min(n, _positive("max_windows", max_windows))
  return np.ascontiguousarray(tokens[:n * seqlen].reshape(n, seqlen), dtype=np.int32)


def calibration_starts(numel: int, nsamples: int, seqlen: int, seed: int = 0) -> list[int]:
  """SparseGPT/Wanda window starts: ``Random(seed).randint(0, numel - seqlen - 1)``, ``nsamples`` times.

  >>> calibration_starts(634743, 3, 512, seed=0)
  [403958, 441001, 42450]
  """
  nsamples, seqlen = _positive("nsamples", nsamples), _positive("seqlen", seqlen)
  if numel - seqlen - 1 < 0:
    raise JaxpruneError(f"text has {numel} tokens: too short for {nsamples} calibration windows of seqlen "
                        f"{seqlen} (needs at least {seqlen + 1} tokens)")
  rng = random.Random(seed)
  return [rng.randint(0, numel - seqlen - 1) for _ in range(nsamples)]


def calibration_windows(tokens, nsamples: int, seqlen: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
  """Random calibration windows, exactly as SparseGPT and Wanda draw them (windows may overlap).

  Args:
    tokens: int ``[N]``, the tokenized text.
    nsamples: number of windows.
    seqlen: window length.
    seed: seed of the Python RNG (``random.Random(seed)``, the same draws as ``random.seed(seed)``).

  Returns:
    ``(windows, starts)``: int32 ``[nsamples, seqlen]`` and the start of each window in ``tokens``.
  """
  tokens = _stream(tokens)
  starts = calibration_starts(tokens.size, nsamples, seqlen, seed)
  windows = np.stack([tokens[i:i + seqlen] for i in starts]).astype(np.int32)
  return windows, starts


def tokens_sha256(windows: np.ndarray) -> str:
  """sha256 (hex) of the windows as little-endian int32 in C order: the identity of what a run saw."""
  return hashlib.sha256(np.ascontiguousarray(windows, dtype="<i4").tobytes()).hexdigest()


def check_vocab(tokens: np.ndarray, vocab_size: int | None, source: str) -> None:
  """Raises when a token id is negative or ``>= vocab_size`` (a tokenizer or token file for another model)."""
  if tokens.size == 0:
    return
  lo, hi = int(tokens.min()), int(tokens.max())
  if lo < 0:
    raise JaxpruneError(f"{source}: negative token id {lo}")
  if vocab_size is not None and hi >= vocab_size:
    raise JaxpruneError(f"{source}: token id {hi} is out of range for the model's vocab size {vocab_size}")


def as_windows(windows, *, vocab_size: int | None = None, max_positions: int | None = None,
               what: str = "token windows") -> np.ndarray:
  """``windows`` (an integer array ``[n, seqlen]`` or a :class:`~jaxprune.data.TokenWindows`) as int32, with
  one-line :class:`JaxpruneError` s for a wrong rank, float ids, no windows, ids outside ``[0, vocab_size)``, or
  windows longer than ``max_positions``.

  >>> as_windows(np.array([[1, 2, 3]])).dtype
  dtype('int32')
  """
  arr = np.asarray(getattr(windows, "tokens", windows))
  if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] < 2:
    raise JaxpruneError(f"{what} must be a non-empty integer array (n, seqlen >= 2), got shape {arr.shape}")
  if not np.issubdtype(arr.dtype, np.integer):
    raise JaxpruneError(f"{what} must hold integer token ids, got dtype {arr.dtype}")
  if max_positions is not None and arr.shape[1] > max_positions:
    raise JaxpruneError(f"{what}: seqlen {arr.shape[1]} exceeds the model's {max_positions} positions")
  lo, hi = int(arr.min()), int(arr.max())
  if lo < 0 or (vocab_size is not None and hi >= vocab_size) or hi > np.iinfo(np.int32).max:
    raise JaxpruneError(f"{what}: token ids must lie in [0, {vocab_size}); found ids in [{lo}, {hi}]")
  return np.ascontiguousarray(arr, dtype=np.int32)
