"""Perplexity, by the protocol of SparseGPT/Wanda (see ALGORITHMS.md).

Per window of ``seqlen`` tokens: the mean cross-entropy of the ``seqlen - 1`` shifted next-token predictions;
``ppl = exp(mean over windows)``. Windows are batched, and batches are split over the ``data`` axis of a mesh
(data parallel; params replicated), which gives the same number on 1 or 8 devices.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxprune._batching import Batches
from jaxprune.errors import JaxpruneError
from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig


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


def window_losses(params, tokens: jax.Array, *, config: ModelConfig) -> jax.Array:
  """Mean next-token cross-entropy per window: tokens ``(b, seqlen)`` -> ``(b,)`` float32."""
  ctx = M.context(config, *tokens.shape)
  h = _embed(params, tokens, config=config)
  for i, layer_params in enumerate(params["layers"]):
    h = _block(layer_params, h, ctx, config=config, modes=config.sublayer_modes(i))
  return _head_loss(params, h, tokens, config=config)


_block = jax.jit(M.block, static_argnames=("config", "modes", "taps"))


@functools.partial(jax.jit, static_argnames=("config",))
def _embed(params, tokens, *, config):
  return M.embed(params, tokens, config=config)


@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def _head_loss(params, h, tokens, *, config, chunk: int = 128):
  """Mean shifted cross-entropy per window ``(b,)``.

  The logits are computed ``chunk`` positions at a time (a ``lax.map`` over the unsharded sequence axis), so
  ``(b, chunk, vocab)`` rather than ``(b, seqlen, vocab)`` floats are alive at once.
  """
  b, t, d = h.shape
  n = t - 1
  pad = -n % chunk
  hs = jnp.pad(h[:, :-1], ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d).swapaxes(0, 1)
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad))).reshape(b, -1, chunk).swapaxes(0, 1)

  def nll(args):
    h1, t1 = args
    logits = M.head(params, h1, config=config).astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t1[..., None], axis=-1)[..., 0]

  losses = jax.lax.map(nll, (hs, targets)).swapaxes(0, 1).reshape(b, -1)[:, :n]
  return jnp.mean(losses, axis=-1)


def perplexity(params, windows: np.ndarray, *, config: ModelConfig, batch_size: int = 8, mesh: Mesh | None = None,
               progress: bool = True, desc: str = "eval") -> EvalResult:
  """Perplexity of ``params`` on token ``windows`` ``(n, seqlen)`` int32.

  With ``mesh``, each batch is split over its ``data`` axis; ``batch_size`` is rounded up to a multiple of that
  axis and the last batch padded (padded windows are dropped from the mean).
  """
  windows = np.asarray(windows)
  check_windows(windows, config)
  n, seqlen = windows.shape
  batches = Batches(n, seqlen, config=config, batch_size=batch_size, mesh=mesh)
  params = batches.replicate(params)  # once, not per batch
  losses = []
  start = time.perf_counter()
  bar = tqdm(batches.chunks(windows.astype(np.int32)), total=len(batches), desc=desc, unit="batch",
             disable=not progress, leave=False)
  for tokens, _, real in bar:
    losses.append(np.asarray(window_losses(params, tokens, config=config))[:real])
  per_window = np.concatenate(losses).astype(np.float32)
  seconds = time.perf_counter() - start
  mean = float(np.mean(per_window, dtype=np.float64))
  return EvalResult(float(np.exp(mean)), mean, per_window, n, seqlen, n * seqlen, seconds)


def data_mesh(devices=None) -> Mesh:
  """A 1-D ``("data",)`` mesh over ``devices`` (default: all)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))
