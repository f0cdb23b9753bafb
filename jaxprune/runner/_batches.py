"""Token windows (or activations) in batches over the ``data`` axis of a mesh: one rule for every pass.

The batch is a multiple of the ``data`` axis size (and no larger than needed for ``n`` windows); a last, short
batch is padded with copies of its last window, which get weight 0 and whose outputs are dropped.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxprune.errors import JaxpruneError
from jaxprune.runner._distributed import fetch
from jaxprune.runner._mesh import data_size


class Batches:
  """Batches of ``n`` windows of ``seq`` positions, split over the ``data`` axis of ``mesh``."""

  def __init__(self, n: int, seq: int, *, batch_size: int, mesh: Mesh | None):
    if batch_size < 1:
      raise JaxpruneError(f"batch size must be at least 1, got {batch_size}")
    self.mesh = mesh if mesh is not None and "data" in mesh.shape else None
    shards = data_size(self.mesh)
    self.batch = min(-(-batch_size // shards) * shards, -(-n // shards) * shards)
    self.n, self.seq = n, seq

  def __len__(self) -> int:
    """Number of batches."""
    return -(-self.n // self.batch)

  def put(self, x):
    """``x`` on the devices, its leading (window) axis split over ``data``."""
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, NamedSharding(self.mesh, P("data")))

  def chunks(self, x: np.ndarray):
    """Yields ``(device batch, weights (batch,) float32, real rows)`` covering ``x`` ``(n, ...)`` in order."""
    for lo in range(0, self.n, self.batch):
      part = x[lo:lo + self.batch]
      real = len(part)
      if real < self.batch:
        part = np.concatenate([part, np.repeat(part[-1:], self.batch - real, axis=0)])
      weights = (np.arange(self.batch) < real).astype(np.float32)
      yield self.put(part), self.put(weights), real

  def map(self, fn, x: np.ndarray, *, into: np.ndarray | None = None) -> np.ndarray:
    """``fn`` over the batches of ``x``, outputs gathered to host float32 ``(n, ...)`` (whole on every process of
    a multi-process run). ``into``: a float32 array the outputs may overwrite (see :func:`gathered`)."""
    return gathered(fetched_ahead((fn(batch), real) for batch, _, real in self.chunks(x)), self.n, into=into)


def weighted(x, weights):
  """``x`` ``(b, ...)`` times each window's weight ``weights`` ``(b,)`` in ``x``'s dtype: a padding window -> 0."""
  return x * weights.astype(x.dtype).reshape(-1, *(1,) * (x.ndim - 1))


def fetched_ahead(outputs):
  """``fetch(out, np.float32)[:real]`` for each ``(out, real)`` of ``outputs``, a generator that puts a batch on
  the devices and starts its program when advanced, one batch ahead: the next batch is started before the
  current one is fetched, so that the host's copies (the next batch in, this one out) overlap the devices'
  work instead of waiting between programs. One more batch's outputs are alive at once."""
  pending = None
  for started in itertools.chain(outputs, [None]):  # None: the last batch is started, fetch it
    if pending is not None:
      out, real = pending
      yield fetch(out, np.float32)[:real]
    pending = started


def gathered(parts, n: int, *, into: np.ndarray | None = None) -> np.ndarray:
  """The float32 ``parts`` ``(rows, ...)`` one after the other in one ``(n, ...)`` array: ``into`` when it has that
  shape and dtype (its contents are overwritten), else a new one.

  Why reuse: a pass between blocks gathers activations of the same shape block after block, and fresh memory
  is not free. On a virtual machine that hands freed pages back to its host (free page reporting), memory the
  process has just got from the system is slow to write the first time (see :mod:`jaxprune._memory`): on the
  2-core VM of ``experiments/prune_speed``, gathering a new ``(64, 512, 576)`` float32 array (75 MB) took
  0.35-0.8 s, and the pass's ``other`` seconds fell from 10-25 s to 3-5 s once it reused its arrays.
  """
  out = into
  lo = 0
  for part in parts:
    if out is None or out.shape != (n, *part.shape[1:]) or out.dtype != np.float32:
      out = np.empty((n, *part.shape[1:]), np.float32)
    out[lo:lo + len(part)] = part
    lo += len(part)
  if lo != n:
    raise ValueError(f"gathered {lo} rows, expected {n}")
  return out
