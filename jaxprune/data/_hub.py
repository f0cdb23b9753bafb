"""Hugging Face datasets used by the pruning papers, with the SparseGPT/Wanda ``datautils`` conventions.

- ``wikitext2``: ``wikitext``/``wikitext-2-raw-v1``; eval = test split joined with ``"\\n\\n"``, calibration =
  train split joined with ``" "``.
- ``ptb``: ``ptb_text_only``/``penn_treebank``; eval = test split, calibration = train split, both joined with
  ``" "``.
- ``c4``: ``allenai/c4`` English shards; eval = the first 1100 documents of validation shard 0 joined with
  ``" "`` and cut to ``256 * seqlen`` tokens; calibration = per sample, a random train-shard-0 document longer
  than ``seqlen`` tokens and a random window of it (see :func:`c4_calibration`).

These need the network: offline (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, or the ``HF_ENDPOINT`` host
unreachable within a few seconds, see :mod:`jaxprune.io._hub`) they fail at once with a
:class:`~jaxprune.errors.JaxpruneError`.
"""
from __future__ import annotations

import random

import numpy as np

from jaxprune.errors import JaxpruneError
from jaxprune.io._hub import PROBE_TIMEOUT_S, require_hub

C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256


def ensure_online(name: str, *, timeout: float = PROBE_TIMEOUT_S) -> None:
  """Raises a one-line :class:`JaxpruneError` unless the hub is allowed and reachable (checked in ``timeout`` s)."""
  require_hub(f"dataset {name!r}", "use a bundled corpus (wiki, austen), a text file or a .npy token file",
              "HF_DATASETS_OFFLINE", timeout=timeout)


def _load(name: str, *args, **kwargs):
  """``datasets.load_dataset`` with its failures turned into one-line errors."""
  import datasets  # heavy: imported only when a hub dataset is asked for

  try:
    return datasets.load_dataset(*args, **kwargs)
  except Exception as err:  # noqa: BLE001 - datasets raises many unrelated types
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise JaxpruneError(f"cannot load dataset {name!r}: {first}") from None


def hub_text(name: str, role: str) -> str:
  """The joined text of ``wikitext2`` or ``ptb`` for ``role`` ``"eval"`` or ``"calib"`` (network needed)."""
  ensure_online(name)
  if name == "wikitext2":
    split = _load(name, "wikitext", "wikitext-2-raw-v1", split="test" if role == "eval" else "train")
    return ("\n\n" if role == "eval" else " ").join(split["text"])
  if name == "ptb":
    split = _load(name, "ptb_text_only", "penn_treebank", split="test" if role == "eval" else "train")
    return " ".join(split["sentence"])
  raise JaxpruneError(f"no joined-text convention for dataset {name!r}")


def c4_documents(role: str) -> list[str]:
  """The C4 documents of ``role``: validation shard 0 (first 1100) for eval, train shard 0 for calibration."""
  ensure_online("c4")
  if role == "eval":
    split = _load("c4", "allenai/c4", data_files={"validation": C4_VALIDATION}, split="validation")
    return list(split[:C4_EVAL_DOCS]["text"])
  split = _load("c4", "allenai/c4", data_files={"train": C4_TRAIN}, split="train")
  return list(split["text"])


def c4_calibration(documents, encode, *, nsamples: int, seqlen: int,
                   seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """SparseGPT/Wanda's C4 calibration sampling.

  Per sample: draw documents ``d = rng.randint(0, len(documents) - 1)`` until one encodes to more than
  ``seqlen`` tokens, then ``i = rng.randint(0, len(ids) - seqlen - 1)`` and take ``ids[i:i + seqlen]``, with
  ``rng = random.Random(seed)`` (the same draws as ``random.seed(seed)`` in the originals).

  Args:
    documents: a sequence of texts.
    encode: ``str -> sequence[int]`` (the tokenizer, without special tokens).
    nsamples, seqlen: number and length of the windows.
    seed: the seed of the Python RNG.

  Returns:
    ``(windows, picks)``: int32 ``(nsamples, seqlen)`` and the ``(document, start)`` of each window.
  """
  if not documents:
    raise JaxpruneError("no C4 documents to calibrate on")
  rng = random.Random(seed)
  windows, picks = np.empty((nsamples, seqlen), np.int32), []
  max_draws = 20 * len(documents) + 1000
  for s in range(nsamples):
    for _ in range(max_draws):
      d = rng.randint(0, len(documents) - 1)
      ids = encode(documents[d])
      if len(ids) > seqlen:
        break
    else:
      raise JaxpruneError(f"no C4 document longer than seqlen {seqlen} tokens found in {max_draws} draws")
    i = rng.randint(0, len(ids) - seqlen - 1)
    windows[s] = np.asarray(ids[i:i + seqlen], dtype=np.int64)
    picks.append((d, i))
  return windows, picks
