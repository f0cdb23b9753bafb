"""From a data argument to token windows: bundled corpus, text file, ``.npy`` token file or hub dataset."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxprune.data import _cache as cache, _corpora as corpora, _hub as hub
from jaxprune.data._windows import calibration_windows, check_vocab, eval_windows, tokens_sha256
from jaxprune.errors import JaxpruneError

ROLES = ("eval", "calib")
_NPY_MAGIC = b"\x93NUMPY"


@dataclasses.dataclass(frozen=True, eq=False)
class TokenWindows:
  """Token windows ready for a model, and where they came from.

  Attributes:
    tokens: int32 ``[n, seqlen]``.
    source: the data argument (corpus name, path or dataset name).
    sha256: :func:`~jaxprune.data._windows.tokens_sha256` of ``tokens``.
    total_tokens: length of the whole tokenized text (the number of tokens in a ``.npy`` file).
    starts: calibration window starts in the token stream (``(document, start)`` pairs for C4); None for
      evaluation windows and ``.npy`` files.
  """

  tokens: np.ndarray
  source: str
  sha256: str
  total_tokens: int
  starts: tuple | None = None

  @property
  def seqlen(self) -> int:
    return int(self.tokens.shape[1])

  @property
  def num_windows(self) -> int:
    return int(self.tokens.shape[0])


def tokenize(text: str, tokenizer, *, use_cache: bool = True) -> np.ndarray:
  """``tokenizer.encode(text, add_special_tokens=False)`` as int32 ``[N]``, cached on disk (see ``cache``)."""
  path = None
  if use_cache:
    path = cache.cache_path(corpora.text_sha256(text), cache.tokenizer_fingerprint(tokenizer))
    cached = cache.load_cached(path)
    if cached is not None:
      return cached
  ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
  if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
    raise JaxpruneError(f"tokenizer produced ids outside int32 (min {ids.min()}, max {ids.max()})")
  ids = ids.astype(np.int32)
  if path is not None:
    cache.store(path, ids)
  return ids


def read_npy_windows(source: str) -> np.ndarray:
  """The 2-D integer array ``[n, seqlen]`` of a ``.npy`` token file, checked for its format."""
  path = Path(source).expanduser()
  if path.is_dir() or not path.exists():
    raise JaxpruneError(f"no such token file: {source}")
  try:
    with open(path, "rb") as f:
      magic = f.read(len(_NPY_MAGIC))
  except OSError as err:
    raise JaxpruneError(f"cannot read {source}: {err.strerror}") from None
  if magic != _NPY_MAGIC:
    raise JaxpruneError(f"{source} is not a NumPy .npy file (no .npy header): token windows must be saved with "
                        "numpy.save as an integer array [n, seqlen]; give a text file another extension")
  try:
    arr = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as err:
    raise JaxpruneError(f"{source} is not a readable .npy array ({str(err).splitlines()[0]})") from None
  if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
    raise JaxpruneError(f"{source}: expected a 2-D integer array [n, seqlen] of token ids, "
                        f"got shape {arr.shape} dtype {arr.dtype}")
  return arr


def _npy_windows(source: str, *, seqlen: int | None, role: str, nsamples: int | None,
                 max_windows: int | None) -> tuple[np.ndarray, int]:
  """Exact windows from an int ``[n, seqlen]`` ``.npy`` file: the first ``nsamples``/``max_windows`` rows."""
  arr = read_npy_windows(source)
  if seqlen is not None and arr.shape[1] != seqlen:
    raise JaxpruneError(f"{source} holds windows of seqlen {arr.shape[1]}, but seqlen {seqlen} was requested")
  if arr.shape[0] == 0:
    raise JaxpruneError(f"{source} holds no windows")
  if arr.min() < 0 or arr.max() > np.iinfo(np.int32).max:
    raise JaxpruneError(f"{source}: token ids outside [0, 2**31) (min {arr.min()}, max {arr.max()})")
  if role == "calib":
    if arr.shape[0] < nsamples:
      raise JaxpruneError(f"{source} holds {arr.shape[0]} windows, fewer than the {nsamples} calibration "
                          f"samples requested")
    rows = nsamples
  else:
    rows = arr.shape[0] if max_windows is None else min(arr.shape[0], max_windows)
  return np.ascontiguousarray(arr[:rows], dtype=np.int32), int(arr.size)


def _c4_windows(tokenizer, *, seqlen: int, role: str, nsamples: int | None, max_windows: int | None,
                seed: int) -> tuple[np.ndarray, int, tuple | None]:
  """C4 with SparseGPT's conventions (see :mod:`jaxprune.data._hub`)."""
  docs = hub.c4_documents(role)
  if role == "calib":
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    windows, picks = hub.c4_calibration(docs, encode, nsamples=nsamples, seqlen=seqlen, seed=seed)
    return windows, int(windows.size), tuple(picks)
  stream = tokenize(" ".join(docs), tokenizer)
  total = int(stream.size)
  return eval_windows(stream[:hub.C4_EVAL_WINDOWS * seqlen], seqlen, max_windows), total, None


def _check_args(seqlen, role, nsamples, max_windows, *, npy: bool) -> None:
  if role not in ROLES:
    raise JaxpruneError(f"role must be one of {ROLES}, got {role!r}")
  for name, value, required in (("seqlen", seqlen, not npy), ("nsamples", nsamples, role == "calib"),
                                ("max_windows", max_windows, False)):
    if value is None and not required:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise JaxpruneError(f"{name} must be a positive integer{' for calibration' if name == 'nsamples' else ''}, "
                          f"got {value!r}")


def load_windows(source: str, *, tokenizer, seqlen: int | None, role: str, nsamples: int | None = None,
                 max_windows: int | None = None, seed: int = 0, vocab_size: int | None = None,
                 use_cache: bool = True) -> TokenWindows:
  """Token windows of ``source`` for evaluation (``role="eval"``) or calibration (``role="calib"``).

  Args:
    source: a bundled corpus (``wiki``, ``austen``, ``mobydick``); a UTF-8 text file; a ``.npy`` int array
      ``[n, seqlen]`` of exact token windows (no tokenizer needed); or ``wikitext2``, ``c4``, ``ptb`` from the
      Hugging Face hub (online only; fails within seconds offline).
    tokenizer: a Hugging Face tokenizer; text is tokenized once with ``encode(text, add_special_tokens=False)``.
      May be None for ``.npy`` sources.
    seqlen: window length (an explicit choice: it changes perplexity); for a ``.npy`` source, None takes the
      file's own width.
    role: ``"eval"``: non-overlapping windows from the start (:func:`eval_windows`); ``"calib"``: ``nsamples``
      random windows (:func:`calibration_windows`).
    nsamples: number of calibration windows (required for ``"calib"``).
    max_windows: at most this many evaluation windows (the first ones).
    seed: calibration seed.
    vocab_size: when given, token ids must be below it.
    use_cache: cache tokenized texts under ``$JAXPRUNE_CACHE/tokens`` (default ``~/.cache/jaxprune/tokens``).

  Returns:
    :class:`TokenWindows` with int32 ``tokens [n, seqlen]``.
  """
  source = str(source)
  _check_args(seqlen, role, nsamples, max_windows, npy=source.endswith(".npy"))
  starts = None
  if source.endswith(".npy"):
    windows, total = _npy_windows(source, seqlen=seqlen, role=role, nsamples=nsamples, max_windows=max_windows)
  else:
    if tokenizer is None:
      raise JaxpruneError(f"a tokenizer is needed to tokenize {source!r} (only .npy token files need none)")
    if source == "c4":
      windows, total, starts = _c4_windows(tokenizer, seqlen=seqlen, role=role, nsamples=nsamples,
                                           max_windows=max_windows, seed=seed)
    else:
      text = hub.hub_text(source, role) if corpora.is_hub(source) else corpora.load_text(source)
      stream = tokenize(text, tokenizer, use_cache=use_cache)
      total = int(stream.size)
      if role == "eval":
        windows = eval_windows(stream, seqlen, max_windows)
      else:
        windows, starts = calibration_windows(stream, nsamples, seqlen, seed)
        starts = tuple(starts)
  check_vocab(windows, vocab_size, source)
  return TokenWindows(tokens=windows, source=source, sha256=tokens_sha256(windows), total_tokens=total,
                      starts=starts)
