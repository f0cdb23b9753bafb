"""Magnitude pruning: drop the weights of smallest ``|W|``.

The baseline of Zhu & Gupta (2017) as run by the Wanda repository (locuslab/wanda): one ranking of ``|W|`` per
weight matrix (or per row with ``scope="row"``), or per group of ``m`` inputs for N:M. No calibration data is
needed and no weight is updated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune.prune.masks import pattern_mask
from jaxprune.prune.patterns import NM, Unstructured
from jaxprune.prune.solvers.base import SolverResult, check_inputs, compute_dtype, finish
from jaxprune.prune.stats import Stats


def magnitude(w: jax.Array, stats: Stats | None = None, *, pattern: Unstructured | NM) -> SolverResult:
  """Prunes ``w`` ``(d_out, d_in)`` by ``|W|`` (``scope=None`` means per layer).

  ``stats`` is used only for the reported error (``None``: Frobenius norm of the change).
  """
  check_inputs("magnitude", w, stats, pattern, needs=None)
  mask = pattern_mask(jnp.abs(w.astype(compute_dtype(w))), pattern, default_scope="layer")
  return finish(w, w, mask, stats)
