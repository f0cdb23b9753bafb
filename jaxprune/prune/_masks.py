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
scores, one bit per pass from the top (32 passes, 64 for float64), each pass an elementwise compare and a count.
The passes run on a uint8 copy of the byte under search (scores whose higher bytes differ from the threshold's
so far become 0 or 255), and a count adds halves of the last axis elementwise before a short sum: XLA's CPU
reductions are much slower than its elementwise loops (``experiments/solver_speed``). Ties at the threshold are
broken, only when some slice has more scores tied at its threshold than it still prunes, by a second radix select
over the positions of the tied scores. Every step is elementwise or a count, so a global
selection also works on row-sharded scores: the counts are summed over devices, nothing is gathered.

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
  # -0.0 as +0.0 by a select: XLA simplifies ``scores + 0.0`` to ``scores`` when it compiles, keeping the sign.
  u = jax.lax.bitcast_convert_type(jnp.where(scores == 0, jnp.zeros((), scores.dtype), scores), utype)
  negative = (u >> (bits - 1)) == 1
  flip = jnp.where(negative, ~jnp.zeros((), utype), jnp.asarray(1, utype) << (bits - 1))
  return u ^ flip, bits


_NARROW = 64  # the halving in :func:`_count` stops at this width (or an odd one); a plain sum adds the rest


def _count(pred: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Number of ``True`` in ``pred`` over ``axes`` (kept as size-1 dimensions), int32.

  Along the last axis the two halves are added elementwise while the width is even and above ``_NARROW``, in the
  narrowest integer type that holds the partial counts (uint8, then int16, then int32): elementwise work, which
  XLA's CPU backend splits over the cores and runs much faster than a reduction. Exact, and local to each device
  for row-sharded ``pred``.
  """
  last = pred.ndim - 1
  if last not in axes:
    return jnp.sum(pred, axis=axes, keepdims=True, dtype=jnp.int32)
  x, most = pred.astype(jnp.uint8), 1
  while x.shape[-1] % 2 == 0 and x.shape[-1] > _NARROW:
    most *= 2
    if most > jnp.iinfo(x.dtype).max:
      x = x.astype(jnp.int16 if most <= jnp.iinfo(jnp.int16).max else jnp.int32)
    half = x.shape[-1] // 2
    x = x[..., :half] + x[..., half:]
  per_row = jnp.sum(x, axis=-1, keepdims=True, dtype=jnp.int32)
  rest = tuple(a for a in axes if a != last)
  return jnp.sum(per_row, axis=rest, keepdims=True, dtype=jnp.int32) if rest else per_row


def _digits(keys: jax.Array, thr: jax.Array, shift: int, width: int, bits: int) -> jax.Array:
  """The ``width`` bits of ``keys < 2**bits`` from bit ``shift`` up, as uint8, where the bits above them equal
  ``thr``'s; 0 where those are lower, 255 where higher. For ``t < 2**width - 1``, ``count(digits <= t)`` is then
  the count of keys up to ``thr``'s high bits followed by ``t``."""
  digit = ((keys >> shift) & (2 ** width - 1)).astype(jnp.uint8)
  if shift + width == bits:
    return digit
  high, thr_high = keys >> (shift + width), thr >> (shift + width)
  return jnp.where(high < thr_high, jnp.uint8(0), jnp.where(high > thr_high, jnp.uint8(255), digit))


def _search(keys: jax.Array, bits: int, k, axes: tuple[int, ...]) -> jax.Array:
  """The smallest ``t`` with ``count(keys <= t) >= k`` over ``axes`` (kept as size-1 dimensions), for unsigned
  ``keys < 2**bits`` and ``k`` at most the count of ``keys < 2**bits - 1`` (a broadcastable int32).

  A radix select, one bit per pass from the top, on a uint8 copy of the keys that holds only the (up to) 8 bits
  under search: ``ceil(bits / 8)`` copies and ``bits`` passes, each a compare and a :func:`_count`.
  """
  count = functools.partial(_count, axes=axes)
  thr = jnp.zeros_like(jnp.max(keys[..., :1], axis=axes, keepdims=True))  # the shape and sharding
  for top in range(bits, 0, -8):
    width = min(8, top)
    digits = _digits(keys, thr, top - width, width, bits)

    def bit_step(i, t, digits=digits, width=width):  # the smallest t with count(digits <= t) >= k
      bit = jnp.left_shift(jnp.uint8(1), (width - 1 - i).astype(jnp.uint8))
      enough = count(digits <= (t | (bit - jnp.uint8(1)))) >= k
      return jnp.where(enough, t, t | bit)

    digit = jax.lax.fori_loop(0, width, bit_step, jnp.zeros_like(thr, dtype=jnp.uint8))
    thr = thr | (digit.astype(keys.dtype) << (top - width))
  return thr


def _lowest(scores: jax.Array, k, axes: tuple[int, ...]):
  """Threshold of the ``k`` lowest scores counted over ``axes`` (kept as size-1 dimensions).

  Returns ``(keys, thr, room)``: the scores' :func:`_ordered_keys`, the key of the ``k``-th smallest, and how
  many of the keys equal to it are still to prune (``k`` minus the count below). (Masks are compared from the
  keys where they are used: XLA then computes them inside each consumer instead of storing them.)
  """
  keys, bits = _ordered_keys(scores)
  k = jnp.asarray(k, jnp.int32)
  thr = _search(keys, bits, k, axes)
  return keys, thr, k - _count(keys < thr, axes)


def _positions(like: jax.Array, dim: int) -> jax.Array:
  """uint32 positions along ``dim`` in the shape of ``like`` (and its sharding, if explicit)."""
  sharding = jax.typeof(like).sharding
  explicit = any(axis is not None for axis in sharding.spec)
  return jax.lax.broadcasted_iota(jnp.uint32, like.shape, dim, out_sharding=sharding if explicit else None)


def _keep(keys, thr, room, axes, order: jax.Array, size: int) -> jax.Array:
  """Keep mask that prunes the keys below ``thr`` and the first ``room`` of those equal to it in ``order``
  (distinct uint32 below ``size`` over ``axes``). The cut in that order is searched only when some slice has
  more keys tied at its threshold than ``room`` (a radix select on the positions of the tied keys); otherwise
  every tied key goes."""
  crowded = jnp.any(_count(keys == thr, axes) > room)
  bits = size.bit_length()  # 2**bits - 1 >= size marks the keys that are not tied
  none = jnp.full_like(room, 2 ** bits - 1, dtype=jnp.uint32)
  cut = jax.lax.cond(crowded, lambda: _search(jnp.where(keys == thr, order, jnp.uint32(2 ** bits - 1)), bits, room,
                                              axes), lambda: none)
  return ~((keys < thr) | ((keys == thr) & (order <= cut)))


def keep_mask(scores: jax.Array, k) -> jax.Array:
  """Prunes exactly the ``k`` lowest scores along the last axis (stable tie rule); returns the keep mask.

  Args:
    scores: ``(..., n)`` real scores (no NaN).
    k: number pruned per slice, a Python int or an integer scalar (may be traced), ``0 <= k <= n``.

  Returns:
    ``(..., n)`` bool, ``False`` at the ``k`` pruned entries of every slice.
  """
  axes = (scores.ndim - 1,)
  keys, thr, room = _lowest(scores, k, axes)
  return _keep(keys, thr, room, axes, _positions(keys, scores.ndim - 1), scores.shape[-1])


def layer_mask(scores: jax.Array, k, *, ties: str = "count") -> jax.Array:
  """Prunes the ``k`` lowest of all of ``scores`` (any shape) in row-major flat order; returns the keep mask.
  (``ties="threshold"``: :func:`threshold_mask` over all of ``scores`` instead.)

  Ties are ordered by flat index, ``row · n + column`` (fewer than ``2**32`` scores).
  """
  if ties == "threshold":
    return threshold_mask(scores, k)
  rows = scores.reshape(-1, scores.shape[-1]) if scores.ndim != 2 else scores
  if rows.size >= 2 ** 32:
    raise ValueError(f"layer_mask ranks fewer than 2**32 scores, got {rows.size}")
  keys, thr, room = _lowest(rows, k, (0, 1))
  flat = _positions(keys, 0) * jnp.uint32(rows.shape[1]) + _positions(keys, 1)
  return _keep(keys, thr, room, (0, 1), flat, rows.size).reshape(scores.shape)


TIES = ("count", "threshold")


def threshold_mask(scores: jax.Array, k, *, axes: tuple[int, ...] | None = None) -> jax.Array:
  """The reference codes' rule: prunes every score ``<=`` the ``(k+1)``-th smallest over ``axes`` (default all).

  At least ``k + 1`` scores go (``k < size``), and every tie at the threshold with them.

  >>> threshold_mask(jnp.array([[3., 1., 1., 2.]]), 1).tolist()
  [[True, False, False, True]]
  """
  axes = tuple(range(scores.ndim)) if axes is None else axes
  keys, bits = _ordered_keys(scores)
  return keys > _search(keys, bits, jnp.asarray(k, jnp.int32) + 1, axes)


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
