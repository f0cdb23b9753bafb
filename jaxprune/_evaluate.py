"""Perplexity, by the protocol of SparseGPT/Wanda (see ALGORITHMS.md).

Per window of ``seqlen`` tokens: the mean cross-entropy of the ``seqlen - 1`` shifted next-token predictions;
``ppl = exp(mean over windows)``. Windows are batched by the :class:`~jaxprune.runner.Runner`, and batches are
split over the ``data`` axis of a mesh (data parallel; params replicated), which gives the same number on 1 or 8
devices.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxprune._memory import retained_memory
from jaxprune.data._windows import as_windows
from jaxprune.io._stream import is_streamed, split
from jaxprune.models._config import ModelConfig
from jaxprune.runner import Runner, as_input, data_mesh
from jaxprune.runner._distributed import fetch

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


@retained_memory()
def perplexity(params, windows: np.ndarray, *, config: ModelConfig, batch_size: int = 8, mesh: Mesh | None = None,
               progress: bool = True, desc: str = "eval") -> EvalResult:
  """Perplexity of ``params`` on token ``windows`` ``(n, seqlen)`` int32.

  With ``mesh``, each batch is split over its ``data`` axis; ``batch_size`` is rounded up to a multiple of that
  axis and the last batch padded (padded windows are dropped from the mean). A streamed model (blocks read from
  disk when used) is run block by block over all windows, so that each block is read once: the same programs
  on the same batches, with the residual stream of every window kept on the host in float32 between blocks.
  """
  windows = check_windows(windows, config)
  n, seqlen = windows.shape
  runner = Runner(config, mesh=mesh, batch_size=batch_size)
  batches = runner.batches(n, seqlen)
  start = time.perf_counter()
  if is_streamed(params):
    per_window = _streamed_losses(runner, params, windows, progress=progress, desc=desc)
  else:
    params = runner.place(params)  # once, not per batch
    losses = []
    bar = tqdm(batches.chunks(windows), total=len(batches), desc=desc, unit="batch",
               disable=not progress, leave=False)
    for tokens, _, real in bar:
      losses.append(fetch(runner.window_losses(params, tokens))[:real])
    per_window = np.concatenate(losses).astype(np.float32)
  seconds = time.perf_counter() - start
  mean = float(np.mean(per_window, dtype=np.float64))
  return EvalResult(float(np.exp(mean)), mean, per_window, n, seqlen, n * seqlen, seconds)


def _through(runner: Runner, block, modes, h):
  """``h`` through one block."""
  return runner.block(block, as_input(h, block), modes=modes)


def _streamed_losses(runner: Runner, params, windows: np.ndarray, *, progress: bool, desc: str) -> np.ndarray:
  """Per-window losses of a streamed model: every window through one block before the next block is read."""
  layers = params["layers"]
  rest = runner.place(split(params)[0])  # the embeddings and head are read (if lazy) now and again for the head
  h = runner.map_windows(lambda tokens: runner.embed(rest, tokens), windows)
  del rest
  spare = None  # the activations of the block before the last one (see gathered)
  for i in tqdm(range(len(layers)), desc=desc, unit="block", disable=not progress, leave=False):
    block = runner.place(layers[i])
    layers.prefetch(i + 1)  # read while block i computes
    h, spare = runner.map_windows(functools.partial(_through, runner, block, runner.config.sublayer_modes(i)), h,
                                  into=spare), h
    del block  # before the next block is read
  rest = runner.place(split(params)[0])
  batches = runner.batches(*windows.shape)
  losses = [fetch(runner.head_losses(rest, as_input(x, rest), tokens))[:real]
            for (tokens, _, real), (x, _, _) in zip(batches.chunks(windows), batches.chunks(h))]
  return np.concatenate(losses).astype(np.float32)
