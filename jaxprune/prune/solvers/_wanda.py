"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter 2023, arXiv:2306.11695).

Score ``|W_ij| · sqrt(s_j)`` with ``s_j = Σ_t x_tj²`` (``stats.sq_norms``; the reference keeps a mean over
sequences, the same ranking). Unstructured: the ``floor(s · d_in)`` lowest of each output row are pruned
(``scope=None`` means per row, as in the paper); N:M: the ``m - n`` lowest of each group of ``m`` inputs.
No weight is updated.
"""
from __future__ import annotations

import functools
import jax
import jax.numpy as jnp

from jaxprune.prune._masks import pattern_mask
from jaxprune.prune._patterns import NM, Unstructured
from jaxprune.prune.solvers._base import SolverResult, check_inputs, compute_dtype, finish
from jaxprune.prune._stats import Stats


def wanda_scores(w: jax.Array, sq_norms: jax.Array) -> jax.Array:
  """``|W| · sqrt(s)`` for ``w`` ``(d_out, d_in)`` and ``sq_norms`` ``(d_in,)``, in the compute dtype."""
  dtype = compute_dtype(w)
  return jnp.abs(w.astype(dtype)) * jnp.sqrt(sq_norms.astype(dtype))[None, :]


@functools.partial(jax.jit, static_argnames=("pattern", "with_error"))
def wanda(w: jax.Array, stats: Stats, *, pattern: Unstructured | NM, with_error: bool = True) -> SolverResult:
  """Prunes ``w`` ``(d_out, d_in)`` by the Wanda score; needs only ``stats.sq_norms`` (``with_error=False``:
  ``error`` is ``None``)."""
  check_inputs("wanda", w, stats, pattern, needs="stats")
  mask = pattern_mask(wanda_scores(w, stats.sq_norms), pattern, default_scope="row")
  return finish(w, w, mask, stats, with_error=with_error)
