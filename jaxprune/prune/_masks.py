"""Jit-able mask selection from scores. Masks are boolean, ``True`` = kept.

Counts are exact: an unstructured selection prunes ``floor(sparsity · size)`` scores (computed as
``int(size * sparsity)`` in float64, as the reference code does), whatever the ties.

Tie rule (the default everywhere in jaxprune, ``ties="count"``): among equal scores, the one with the **lower
flat index is pruned first**, i.e. the pruned set is the first ``k`` entries of a stable ascending sort. The
reference implementations differ here: the magnitude code of the Wanda repository and SparseGPT prune every
score ``<=`` the one at position ``floor(s·n)`` (0-based) of the ascending sort, so at least one weight more than
``floor(s·n)`` and every tie at that threshold; ``ties="threshold"`` selects that rule (for reproducing them).
Wanda and ADMM prune exactly ``floor(s·n)``, and ``torch.topk`` leaves the order of ties unspecified.

No sort: the threshold (the ``k``-th smallest score) is found by a radix select on the bit patterns of the
scores -- 32 passes (64 for float64) that each compare every score with a candidate and count, in one
``lax.fori_loop`` -- and ties at the threshold are broken with a cumulative count, computed only when some
slice has more scores tied at its threshold than it still prunes (rare for continuous scores). Every pass is
an elementwise compare and a reduction, so a global selection also works on row-sharded scores: the counts
are summed over devices, nothing is gathered. Counts along the last axis are summed in float32 (exact: a row
has fewer than 2^24 entries).

>>> import jax.numpy as jnp
>>> keep_mask(jnp.array([[3., 1., 1., 2.]]), 2).tolist()
[[True, False, False, True]]
>>> nm_mask(jnp.array([[4., 3., 2., 1., 1., 1., 1., 1.]]), n=2, m=4).tolist()
[[True, True, False, False, False, False, True, True]]
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprune.prune._patterns import NM, Unstructured


def num_pruned(size: int, sparsity: float) -> int:
  """``floor(sparsity · size)``, the exact number of weights an unstructured selection prunes."""
  return int(size * sparsity)


def _ordered_keys(scores: jax.Array):
  """Unsigned integers ordered as the float ``scores`` (``-0.0`` counted as ``+0.0``), and their bit width."""
  if scores.dtype == jnp.float64:
    utype, bits = jnp.uint64, 64
  else:
    scores, utype, bits = scores.astype(jnp.float32), jnp.uint32, 32
  u = jax.lax.bitcast_convert_type(scores + 0.0, utype)
  negative = (u >> (bits - 1)) == 1
  flip = jnp.where(negative, ~jnp.zeros((), utype), jnp.asarray(1, utype) << (bits - 1))
  return u ^ flip, bits


_EXACT_F32 = 2 ** 24  # float32 counts every integer up to here exactly


def _count(pred: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Number of ``True`` in ``pred`` over ``axes`` (kept as size-1 dimensions), int32."""
  last = pred.ndim - 1
  if last not in axes or pred.shape[-1] >= _EXACT_F32:
    return jnp.sum(pred, axis=axes, keepdims=True, dtype=jnp.int32)
  per_row = jnp.sum(pred.astype(jnp.float32), axis=-1, keepdims=True).astype(jnp.int32)
  rest = tuple(a for a in axes if a != last)
  return jnp.sum(per_row, axis=rest, keepdims=True, dtype=jnp.int32) if rest else per_row


def _lowest(scores: jax.Array, k, axes: tuple[int, ...]):
  """Threshold of the ``k`` lowest scores counted over ``axes`` (kept as size-1 dimensions).

  Returns ``(below, tied, room)``: scores strictly below the ``k``-th smallest, scores equal to it, and how many
  of the tied ones are still to prune (``k`` minus the count below).
  """
  keys, bits = _ordered_keys(scores)
  utype = keys.dtype
  k = jnp.asarray(k, jnp.int32)
  one = jnp.asarray(1, utype)
  count = functools.partial(_count, axes=axes)

  def bit_step(i, prefix):  # the smallest T with count(keys <= T) >= k, built from the top bit down
    bit = one << (bits - 1 - i).astype(utype)
    enough = count(keys <= (prefix | (bit - one))) >= k
    return jnp.where(enough, prefix, prefix | bit)

  prefix = jnp.zeros_like(jnp.max(keys, axis=axes, keepdims=True))
  thr = jax.lax.fori_loop(0, bits, bit_step, prefix)
  below = keys < thr
  return below, keys == thr, k - count(below)


def _keep(below, tied, room, axes, tie_rank) -> jax.Array:
  """Keep mask that prunes ``below`` and the first ``room`` of ``tied`` in the order of ``tie_rank()`` (ranks
  from 1 over ``axes``). The ranks, a cumulative sum, are computed only when some slice has more scores tied
  at its threshold than ``room``; otherwise every tied score goes."""
  crowded = jnp.any(_count(tied, axes) > room)
  return ~jax.lax.cond(crowded, lambda: below | (tied & (tie_rank() <= room)), lambda: below | tied)


def keep_mask(scores: jax.Array, k) -> jax.Array:
  """Prunes exactly the ``k`` lowest scores along the last axis (stable tie rule); returns the keep mask.

  Args:
    scores: ``(..., n)`` real scores (no NaN).
    k: number pruned per slice, a Python int or an integer scalar (may be traced), ``0 <= k <= n``.

  Returns:
    ``(..., n)`` bool, ``False`` at the ``k`` pruned entries of every slice.
  """
  axes = (scores.ndim - 1,)
  below, tied, room = _lowest(scores, k, axes)
  return _keep(below, tied, room, axes, lambda: jnp.cumsum(tied, axis=-1, dtype=jnp.int32))


def layer_mask(scores: jax.Array, k, *, ties: str = "count") -> jax.Array:
  """Prunes the ``k`` lowest of all of ``scores`` (any shape) in row-major flat order; returns the keep mask.
  (``ties="threshold"``: :func:`threshold_mask` over all of ``scores`` instead.)

  The tie order needs the number of tied scores in earlier rows: a cumulative sum over the (small) vector of
  per-row counts, replicated first when the rows are explicitly sharded (mesh axes of type ``Explicit``).
  """
  if ties == "threshold":
    return threshold_mask(scores, k)
  rows = scores.reshape(-1, scores.shape[-1]) if scores.ndim != 2 else scores
  below, tied, room = _lowest(rows, k, (0, 1))

  def tie_rank():
    per_row = jnp.sum(tied, axis=1, dtype=jnp.int32)
    sharding = jax.typeof(per_row).sharding
    if any(axis is not None for axis in sharding.spec):
      per_row = jax.sharding.reshard(per_row, NamedSharding(sharding.mesh, P()))
    earlier = jnp.cumsum(per_row, dtype=jnp.int32) - per_row
    return jnp.cumsum(tied, axis=1, dtype=jnp.int32) + earlier[:, None]

  return _keep(below, tied, room, (0, 1), tie_rank).reshape(scores.shape)


TIES = ("count", "threshold")


def threshold_mask(scores: jax.Array, k, *, axes: tuple[int, ...] | None = None) -> jax.Array:
  """The reference codes' rule: prunes every score ``<=`` the ``(k+1)``-th smallest over ``axes`` (default all).

  At least ``k + 1`` scores go (``k < size``), and every tie at the threshold with them.

  >>> threshold_mask(jnp.array([[3., 1., 1., 2.]]), 1).tolist()
  [[True, False, False, True]]
  """
  axes = tuple(range(scores.ndim)) if axes is None else axes
  below, tied, _ = _lowest(scores, jnp.asarray(k, jnp.int32) + 1, axes)
  return ~(below | tied)


def unstructured_mask(scores: jax.Array, *, sparsity: float, scope: str, ties: str = "count") -> jax.Array:
  """Keep mask pruning the ``floor(sparsity · size)`` lowest ``scores`` ``(d_out, d_in)`` per ``"layer"`` or
  ``"row"``; with ``ties="threshold"``, every score up to the next one as well (see the module docstring)."""
  if scope not in ("row", "layer"):
    raise ValueError(f"unknown scope {scope!r}")
  if scope == "layer":
    return layer_mask(scores, num_pruned(scores.size, sparsity), ties=ties)
  k = num_pruned(scores.shape[-1], sparsity)
  return threshold_mask(scores, k, axes=(scores.ndim - 1,)) if ties == "threshold" else keep_mask(scores, k)


def nm_mask(scores: jax.Array, *, n: int, m: int) -> jax.Array:
  """Keep mask with the ``n`` highest of every ``m`` consecutive scores along the last axis kept.

  Each score's rank in its group (how many of the group precede it in a stable ascending order) is counted
  with ``m`` elementwise comparisons; the ``m - n`` of rank below ``m - n`` are pruned.

  Args:
    scores: ``(..., d_in)`` with ``m`` dividing ``d_in``.
    n: kept per group; ``m - n`` pruned (lowest first, stable tie rule).
    m: group length.
  """
  groups = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
  position = jnp.arange(m).reshape((1,) * (groups.ndim - 1) + (m,))
  rank = jnp.zeros(groups.shape, jnp.int32)
  for other in range(m):
    s = groups[..., other:other + 1]
    rank = rank + ((s < groups) | ((s == groups) & (other < position))).astype(jnp.int32)
  return (rank >= m - n).reshape(scores.shape)


def pattern_mask(scores: jax.Array, pattern: Unstructured | NM, *, default_scope: str,
                 ties: str = "count") -> jax.Array:
  """Keep mask for ``pattern`` from ``scores`` ``(d_out, d_in)``; ``default_scope`` stands in for ``scope=None``;
  ``ties`` applies to unstructured patterns (N:M always prunes exactly ``m - n`` per group)."""
  if isinstance(pattern, NM):
    pattern.check_width(scores.shape[-1])
    return nm_mask(scores, n=pattern.n, m=pattern.m)
  return unstructured_mask(scores, sparsity=pattern.sparsity, scope=pattern.scope or default_scope, ties=ties)
