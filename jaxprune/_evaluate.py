"""Perplexity, by the protocol of SparseGPT/Wanda (see ALGORITHMS.md).

Per window of ``seqlen`` tokens: the mean cross-entropy of the ``seqlen - 1`` shifted next-token predictions;
``ppl = exp(mean over windows)``. Windows are batched by the :class:`~jaxprune.runner.Runner`, and batches are
split over the ``data`` axis of a mesh (data parallel; params replicated), which gives the same number on 1 or 8
devices.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxprune.data._windows import as_windows
from jaxprune.models._config import ModelConfig
from jaxprune.runner import Runner, data_mesh

__all__ = ["EvalResult", "check_windows", "data_mesh", "perplexity"]


@dataclasses.dataclass(frozen=True)
class EvalResult:
  perplexity: float
  mean_loss: float
  window_losses: np.ndarray  # (windows,) float32
  windows: int
  seqlen: int
  tokens: int  # windows * seqlen
  seconds: float

  def to_json(self) -> dict:
    return {"perplexity": self.perplexity, "mean_loss": self.mean_loss, "windows": self.windows,
            "seqlen": self.seqlen, "tokens": self.tokens, "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens / self.seconds, 1)}


def check_windows(windows, config: ModelConfig, what: str = "token windows") -> np.ndarray:
  """``windows`` (an integer array ``(n, seqlen)`` or a :class:`~jaxprune.data.TokenWindows`) as int32, with
  one-line errors for windows the model cannot evaluate (see :func:`~jaxprune.data._windows.as_windows`)."""
  return as_windows(windows, vocab_size=config.vocab_size, max_positions=config.max_position_embeddings, what=what)


def perplexity(params, windows: np.ndarray, *, config: ModelConfig, batch_size: int = 8, mesh: Mesh | None = None,
               progress: bool = True, desc: str = "eval") -> EvalResult:
  """Perplexity of ``params`` on token ``windows`` ``(n, seqlen)`` int32.

  With ``mesh``, each batch is split over its ``data`` axis; ``batch_size`` is rounded up to a multiple of that
  axis and the last batch padded (padded windows are dropped from the mean).
  """
  windows = check_windows(windows, config)
  n, seqlen = windows.shape
  runner = Runner(config, mesh=mesh, batch_size=batch_size)
  batches = runner.batches(n, seqlen)
  params = runner.place(params)  # once, not per batch
  losses = []
  start = time.perf_counter()
  bar = tqdm(batches.chunks(windows), total=len(batches), desc=desc, unit="batch",
             disable=not progress, leave=False)
  for tokens, _, real in bar:
    losses.append(np.asarray(runner.window_losses(params, tokens))[:real])
  per_window = np.concatenate(losses).astype(np.float32)
  seconds = time.perf_counter() - start
  mean = float(np.mean(per_window, dtype=np.float64))
  return EvalResult(float(np.exp(mean)), mean, per_window, n, seqlen, n * seqlen, seconds)
