"""Jit-able mask selection from scores. Masks are boolean, ``True`` = kept.

Counts are exact: an unstructured selection prunes ``floor(sparsity · size)`` scores (computed as
``int(size * sparsity)`` in float64, as the reference code does), whatever the ties.

Tie rule (everywhere in jaxprune): among equal scores, the one with the **lower flat index is pruned first**,
i.e. the pruned set is the first ``k`` entries of a stable ascending sort. The reference implementations
differ here: the Wanda/magnitude code prunes every weight equal to the threshold (a few more than
``floor(s·n)``), SparseGPT prunes every score ``<=`` the ``floor(s·n)``-th smallest, and ``torch.topk`` leaves
the order of ties unspecified.

The selection sorts the values (no argsort) and breaks ties at the threshold with a cumulative count, so it
costs one sort plus a few elementwise passes, and works on sharded inputs (the result does not depend on how
``scores`` are laid out over devices).

>>> import jax.numpy as jnp
>>> keep_mask(jnp.array([[3., 1., 1., 2.]]), 2).tolist()
[[True, False, False, True]]
>>> nm_mask(jnp.array([[4., 3., 2., 1., 1., 1., 1., 1.]]), n=2, m=4).tolist()
[[True, True, False, False, False, False, True, True]]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprune.prune.patterns import NM, Unstructured


def num_pruned(size: int, sparsity: float) -> int:
  """``floor(sparsity · size)``, the exact number of weights an unstructured selection prunes."""
  return int(size * sparsity)


def keep_mask(scores: jax.Array, k) -> jax.Array:
  """Prunes exactly the ``k`` lowest scores along the last axis (stable tie rule); returns the keep mask.

  Args:
    scores: ``(..., n)`` real scores (no NaN).
    k: number pruned per slice, a Python int or an integer scalar (may be traced), ``0 <= k <= n``.

  Returns:
    ``(..., n)`` bool, ``False`` at the ``k`` pruned entries of every slice.
  """
  k = jnp.asarray(k, jnp.int32)
  ordered = jnp.sort(scores, axis=-1)
  thr = jax.lax.dynamic_index_in_dim(ordered, jnp.maximum(k - 1, 0), axis=ordered.ndim - 1, keepdims=True)
  below = scores < thr
  tied = scores == thr
  room = k - jnp.sum(below, axis=-1, keepdims=True, dtype=jnp.int32)  # ties at thr still to prune
  tie_rank = jnp.cumsum(tied, axis=-1, dtype=jnp.int32)
  return ~(below | (tied & (tie_rank <= room)))


def layer_mask(scores: jax.Array, k) -> jax.Array:
  """Prunes the ``k`` lowest of all of ``scores`` (any shape) in row-major flat order; returns the keep mask.

  A global ranking needs every score: with automatic sharding the compiler gathers them; with explicitly
  sharded ``scores`` (mesh axes of type ``Explicit``, traced under ``jax.set_mesh``) they are gathered here and
  the mask is given back the sharding of ``scores``.
  """
  sharding = jax.typeof(scores).sharding
  explicit = any(axis is not None for axis in sharding.spec)
  flat = scores.reshape(-1)
  if explicit:
    flat = jax.sharding.reshard(flat, NamedSharding(sharding.mesh, P()))
  mask = keep_mask(flat, k).reshape(scores.shape)
  return jax.sharding.reshard(mask, sharding) if explicit else mask


def unstructured_mask(scores: jax.Array, *, sparsity: float, scope: str) -> jax.Array:
  """Keep mask pruning ``floor(sparsity · size)`` lowest ``scores`` ``(d_out, d_in)`` per ``"layer"`` or ``"row"``."""
  if scope == "row":
    return keep_mask(scores, num_pruned(scores.shape[-1], sparsity))
  if scope == "layer":
    return layer_mask(scores, num_pruned(scores.size, sparsity))
  raise ValueError(f"unknown scope {scope!r}")


def nm_mask(scores: jax.Array, *, n: int, m: int) -> jax.Array:
  """Keep mask with the ``n`` highest of every ``m`` consecutive scores along the last axis kept.

  Args:
    scores: ``(..., d_in)`` with ``m`` dividing ``d_in``.
    n: kept per group; ``m - n`` pruned (lowest first, stable tie rule).
    m: group length.
  """
  groups = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
  return keep_mask(groups, m - n).reshape(scores.shape)


def pattern_mask(scores: jax.Array, pattern: Unstructured | NM, *, default_scope: str) -> jax.Array:
  """Keep mask for ``pattern`` from ``scores`` ``(d_out, d_in)``; ``default_scope`` stands in for ``scope=None``."""
  if isinstance(pattern, NM):
    pattern.check_width(scores.shape[-1])
    return nm_mask(scores, n=pattern.n, m=pattern.m)
  return unstructured_mask(scores, sparsity=pattern.sparsity, scope=pattern.scope or default_scope)
