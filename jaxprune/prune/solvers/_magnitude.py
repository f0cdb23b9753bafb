"""Magnitude pruning: drop the weights of smallest ``|W|``.

The baseline of Zhu & Gupta (2017) as run by the Wanda repository (locuslab/wanda): one ranking of ``|W|`` per
weight matrix (or per row with ``scope="row"``), or per group of ``m`` inputs for N:M. No calibration data is
needed and no weight is updated.
"""
from __future__ import annotations

import functools
import jax
import jax.numpy as jnp

from jaxprune.prune._masks import pattern_mask
from jaxprune.prune._patterns import NM, Unstructured
from jaxprune.prune.solvers._base import SolverResult, check_inputs, check_ties, compute_dtype, finish
from jaxprune.prune._stats import Stats


@functools.partial(jax.jit, static_argnames=("pattern", "ties", "with_error"))
def magnitude(w: jax.Array, stats: Stats | None = None, *, pattern: Unstructured | NM,
              ties: str = "count", with_error: bool = True) -> SolverResult:
  """Prunes ``w`` ``(d_out, d_in)`` by ``|W|`` (``scope=None`` means per layer).

  ``stats`` is used only for the reported error (``None``: Frobenius norm of the change). ``ties``: ``"count"``
  prunes exactly ``floor(s·n)``; ``"threshold"`` every ``|W|`` up to the ``floor(s·n)``-th smallest (0-based) as the
  Wanda repository's magnitude code does (:mod:`jaxprune.prune._masks`). ``with_error=False``: ``error`` is
  ``None``.
  """
  check_inputs("magnitude", w, stats, pattern, needs=None)
  check_ties("magnitude", ties, pattern)
  mask = pattern_mask(jnp.abs(w.astype(compute_dtype(w))), pattern, default_scope="layer", ties=ties)
  return finish(w, w, mask, stats, with_error=with_error)
