"""Token windows in batches over the ``data`` axis of a mesh: one rule for the eval, the pruning pass and depth.

The batch is a multiple of the ``data`` axis size (and no larger than needed for ``n`` windows); a last, short
batch is padded with copies of its last window, which get weight 0 and whose outputs are dropped.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig


class Batches:
  """Batches of ``n`` windows of ``seq`` tokens; ``ctx`` is the model :class:`Context` of one batch."""

  def __init__(self, n: int, seq: int, *, config: ModelConfig, batch_size: int, mesh: Mesh | None):
    self.mesh = mesh if mesh is not None and "data" in mesh.shape else None
    shards = self.mesh.shape["data"] if self.mesh is not None else 1
    self.batch = min(-(-max(1, batch_size) // shards) * shards, -(-n // shards) * shards)
    self.n, self.seq = n, seq
    self.ctx = M.context(config, self.batch, seq)

  def __len__(self) -> int:
    """Number of batches."""
    return -(-self.n // self.batch)

  def put(self, x):
    """``x`` on the devices, its leading (window) axis split over ``data``."""
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, NamedSharding(self.mesh, P("data")))

  def replicate(self, tree):
    """``tree`` (params) on every device of the mesh, once."""
    return jax.device_put(tree, NamedSharding(self.mesh, P()) if self.mesh is not None else None)

  def chunks(self, x: np.ndarray):
    """Yields ``(device batch, weights (batch,) float32, real rows)`` covering ``x`` ``(n, ...)`` in order."""
    for lo in range(0, self.n, self.batch):
      part = x[lo:lo + self.batch]
      real = len(part)
      if real < self.batch:
        part = np.concatenate([part, np.repeat(part[-1:], self.batch - real, axis=0)])
      weights = (np.arange(self.batch) < real).astype(np.float32)
      yield self.put(part), self.put(weights), real

  def map(self, fn, x: np.ndarray) -> np.ndarray:
    """``fn`` over the batches of ``x``, outputs gathered to host float32 ``(n, ...)``."""
    return np.concatenate([np.asarray(fn(batch), np.float32)[:real] for batch, _, real in self.chunks(x)])
