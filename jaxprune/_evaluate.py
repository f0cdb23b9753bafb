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

from jaxprune.errors import JaxpruneError
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


def check_windows(windows: np.ndarray, config: ModelConfig) -> None:
  """One-line errors for token windows the model cannot evaluate."""
  if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
    raise JaxpruneError(f"token windows must be a non-empty (n, seqlen >= 2) array, got shape {windows.shape}")
  seqlen = windows.shape[1]
  limit = config.max_position_embeddings
  if seqlen > limit:
    raise JaxpruneError(f"seqlen {seqlen} exceeds the model's {limit} positions (max_position_embeddings)")
  lo, hi = int(windows.min()), int(windows.max())
  if lo < 0 or hi >= config.vocab_size:
    raise JaxpruneError(f"token ids must lie in [0, {config.vocab_size}); found ids in [{lo}, {hi}]")


def perplexity(params, windows: np.ndarray, *, config: ModelConfig, batch_size: int = 8, mesh: Mesh | None = None,
               progress: bool = True, desc: str = "eval") -> EvalResult:
  """Perplexity of ``params`` on token ``windows`` ``(n, seqlen)`` int32.

  With ``mesh``, each batch is split over its ``data`` axis; ``batch_size`` is rounded up to a multiple of that
  axis and the last batch padded (padded windows are dropped from the mean).
  """
  windows = np.asarray(windows)
  check_windows(windows, config)
  n, seqlen = windows.shape
  runner = Runner(config, mesh=mesh, batch_size=batch_size)
  batches = runner.batches(n, seqlen)
  params = runner.place(params)  # once, not per batch
  losses = []
  start = time.perf_counter()
  bar = tqdm(batches.chunks(windows.astype(np.int32)), total=len(batches), desc=desc, unit="batch",
             disable=not progress, leave=False)
  for tokens, _, real in bar:
    losses.append(np.asarray(runner.window_losses(params, tokens))[:real])
  per_window = np.concatenate(losses).astype(np.float32)
  seconds = time.perf_counter() - start
  mean = float(np.mean(per_window, dtype=np.float64))
  return EvalResult(float(np.exp(mean)), mean, per_window, n, seqlen, n * seqlen, seconds)
