"""SparseGPT: one-shot pruning with approximate OBS updates (Frantar & Alistarh 2023, arXiv:2301.00774).

A port of the reference ``SparseGPT.fasterprune`` (IST-DASLab/sparsegpt), in float32 with ``HIGHEST``
precision:

1. Dead inputs (``H_jj = 0``): ``H_jj = 1`` and ``W[:, j] = 0``.
2. Damping ``H += percdamp · mean(diag H) · I``; ``U`` = upper Cholesky factor of ``H⁻¹``. Should a Cholesky
   factorisation fail (NaN in float32), the damping is multiplied by 10 and the factorisation retried, up to
   ``max_retries`` times inside the compiled program; if all fail, ``U = diag(H)^(-1/2)`` (no cross-column
   update) so the output is never NaN. This step depends on the statistics alone: :func:`sparsegpt_prepare` does
   it once for the linears that read the same inputs, and ``prepared=`` hands it to each.
3. Columns in blocks of ``blocksize`` (the last block may be narrower: the weights are padded with zero columns
   whose ``U`` rows are those of the identity). Unstructured: at the start of each block the scores
   ``W² / diag(U)²`` of the block are ranked **jointly over all rows** and exactly ``floor(s · rows · width)``
   lowest are pruned (stable tie rule of :mod:`jaxprune.prune._masks`); ``ties="threshold"`` prunes, as the
   reference does, every score ``<=`` the one at position ``floor(s·n)`` of the sorted block (0-based): one or
   more weights beyond the count. N:M: at the start of every group of
   ``m`` columns, per row, the ``m - n`` lowest scores of the group (from the weights updated so far).
4. Column by column: ``q = w`` with pruned entries zeroed, ``e = (w - q) / U_ii``, ``W[:, i:] -= e ⊗ U[i, i:]``
   within the block; after the block, ``W -= E · U[block, :]`` on the later columns (one matmul). The same
   regrouping is applied inside a block: its columns run in sub-blocks of at most 16, each followed by one
   product for the block's later columns, so a column's update touches 16 columns, not the whole block.
5. The reconstruction error of the returned weights without a product with ``G``: the update is ``W - Ŵ = E·U``
   (``E``: every column's ``e``), so ``tr((W - Ŵ)(G + δI)(W - Ŵ)ᵀ) = ‖E‖²`` and the error is
   ``‖E‖² - δ‖W - Ŵ‖²``, from ``O(d_out · d_in)`` work instead of ``2 · d_out · d_in²`` (measured in
   ``experiments/solver_speed``). Weights returned in a narrower dtype than float32 are rounded after the update,
   and a factorisation that failed leaves ``U`` unrelated to ``G``: there the error is the product, as for the
   other solvers.

The pass is two nested ``lax.fori_loop`` s (blocks, sub-blocks) over dynamic slices, so tracing does not grow
with the width, and the work is dominated by the lazy block matmuls (``2 · d_out · d_in²`` flops).
"""
from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxprune.errors import JaxpruneError
from jaxprune.prune._masks import layer_mask, nm_mask, num_pruned
from jaxprune.prune._patterns import NM, Unstructured
from jaxprune.prune.solvers._base import (HIGHEST, SolverResult, check_gram, check_inputs, check_ties,
                                          check_with_error, compute_dtype, finish, reconstruction_error)
from jaxprune.prune._stats import Stats

_SUB_COLUMNS = 16
"""At most this many columns of a block are updated column by column before the rest of the block absorbs them."""


def inverse_cholesky_upper(h: jax.Array, *, percdamp: float, max_retries: int = 6, pad: int = 0) -> jax.Array:
  """Upper Cholesky factor ``U`` of ``(H + δI)⁻¹`` (``UᵀU = (H + δI)⁻¹``), ``δ = percdamp · mean(diag H)``.

  ``U`` is computed without forming ``(H + δI)⁻¹``: with ``J`` the reversal permutation, ``J(H + δI)J = LLᵀ``
  gives ``H + δI = RRᵀ`` with ``R = JLJ`` upper triangular, so ``(H + δI)⁻¹ = (R⁻¹)ᵀR⁻¹`` and ``U = R⁻¹ =
  J L⁻¹ J`` (the factor is unique: positive diagonal). One Cholesky factorisation and one triangular inverse,
  and about three ``d × d`` buffers at once, which matters at ``d = 11008`` (0.5 GB each in float32).

  Args:
    h: ``(d, d)`` symmetric positive semi-definite matrix; a zero diagonal entry (an input that was never
      active) is taken as 1, as SparseGPT does.
    percdamp: relative damping.
    max_retries: how many times ``δ`` is multiplied by 10 (or set to ``0.01 · mean(diag H)`` if it was 0)
      while the factorisation has non-finite entries.
    pad: identity rows and columns appended (``U`` of ``diag(H, I)``, whose last ``pad`` rows and columns are
      exactly those of the identity).

  Returns:
    ``(d + pad, d + pad)`` upper-triangular ``U``, finite (``diag(H)^(-1/2)`` when every attempt failed).
  """
  return _inverse_cholesky_upper(h, percdamp=percdamp, max_retries=max_retries, pad=pad)[0]


def _inverse_cholesky_upper(h, *, percdamp: float, max_retries: int, pad: int):
  """:func:`inverse_cholesky_upper`'s ``U``, the damping ``δ`` of the factorisation it comes from, and whether one
  succeeded (``False``: ``U`` is the ``diag(H)^(-1/2)`` fallback)."""
  d = h.shape[0]
  n = d + pad
  diag = jnp.diag(h)
  diag = jnp.where(diag == 0, jnp.ones_like(diag), diag)
  mean_diag = jnp.mean(diag)
  damp0 = percdamp * mean_diag

  def finite(x):
    return jnp.isfinite(jnp.max(jnp.abs(x)))  # NaN propagates through max; no d × d mask is formed

  def damping(tries):
    """``δ`` of try ``tries``: ``damp0`` times 10 per earlier failure (``0.01 · mean(diag H)`` first if 0)."""
    return jnp.where(damp0 > 0, damp0 * 10.0 ** tries.astype(h.dtype),
                     jnp.where(tries > 0, 0.01 * mean_diag * 10.0 ** (tries - 1).astype(h.dtype), 0))

  def attempt(state):
    """Try ``tries``: ``L`` with ``J(diag(H, I) + δI)J = LLᵀ``.

    The reversed matrix is copied once and its diagonal written in place (no ``d × d`` mask or index array);
    the factorisation overwrites it.
    """
    tries, _, _ = state
    on_diag = jnp.arange(n)
    damped_diag = jnp.concatenate([jnp.ones((pad,), h.dtype), (diag + damping(tries))[::-1]])
    damped = jnp.pad(h, ((0, pad), (0, pad)))[::-1, ::-1].at[on_diag, on_diag].set(damped_diag)
    lower = jax.lax.linalg.cholesky(damped.T, symmetrize_input=False)  # symmetric: reads the lower triangle
    return tries + 1, finite(lower), lower.T  # carried as Lᵀ: row-major Lᵀ is the column-major L LAPACK uses

  # The factor is the loop's state (no second d × d copy); the first try runs inside the loop.
  tries, _, lower_t = jax.lax.while_loop(lambda s: (s[0] <= max_retries) & ~s[1], attempt,
                                         (jnp.int32(0), jnp.bool_(False), jnp.zeros((n, n), h.dtype)))
  lower_inv = _lower_inverse(lower_t.T)
  ok = finite(lower_inv)
  fallback = jax.lax.rsqrt(jnp.concatenate([diag, jnp.ones((pad,), h.dtype)]))
  u = jnp.where(ok, lower_inv[::-1, ::-1], 0)
  on_diag = jnp.arange(n)
  return u.at[on_diag, on_diag].set(jnp.where(ok, u[on_diag, on_diag], fallback)), damping(tries - 1), ok


_TRIANGULAR_BASE = 256


def _lower_inverse(lower: jax.Array) -> jax.Array:
  """``L⁻¹`` of a lower-triangular ``(n, n)`` matrix by halves: ``[[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [-D⁻¹CA⁻¹,
  D⁻¹]]``, down to triangular solves of at most :data:`_TRIANGULAR_BASE` rows. The off-diagonal blocks are
  matrix products, which run near the machine's matmul rate, where one ``n``-row triangular solve does not."""
  n = lower.shape[0]
  if n <= _TRIANGULAR_BASE:
    return jax.lax.linalg.triangular_solve(lower, jnp.eye(n, dtype=lower.dtype), left_side=True, lower=True)
  k = -(-n // 2 // 128) * 128  # a multiple of 128 rows on top
  a_inv, d_inv = _lower_inverse(lower[:k, :k]), _lower_inverse(lower[k:, k:])
  c = -jnp.matmul(d_inv, jnp.matmul(lower[k:, :k], a_inv, precision=HIGHEST), precision=HIGHEST)
  return jnp.block([[a_inv, jnp.zeros((k, n - k), lower.dtype)], [c, d_inv]])


def _obs_columns(wt, errt, u1, maskt, start, count):
  """OBS update of columns ``start .. start+count-1`` of a sub-block in order (SparseGPT Algorithm 1, inner loop).

  The sub-block is held transposed, one weight column per row, so that every step reads and writes contiguous
  memory: ``wt``, ``errt``, ``maskt``: ``(sub, d_out)``; ``u1``: ``(sub, sub)`` upper triangular. Column ``i``
  becomes its pruned value ``q``; later columns absorb ``e ⊗ U[i, :]``; ``errt[i] = e``. (The arithmetic of
  every entry is that of the untransposed loop; contiguous rows suit a CPU's caches.)
  """

  def column(i, carry):
    wt, errt = carry
    wi = jax.lax.dynamic_index_in_dim(wt, i, axis=0, keepdims=False)
    keep = jax.lax.dynamic_index_in_dim(maskt, i, axis=0, keepdims=False)
    u_row = jax.lax.dynamic_index_in_dim(u1, i, axis=0, keepdims=False)
    q = jnp.where(keep, wi, 0)
    e = (wi - q) / jax.lax.dynamic_index_in_dim(u_row, i, keepdims=False)
    wt = wt - u_row[:, None] * e[None, :]
    wt = jax.lax.dynamic_update_index_in_dim(wt, q, i, axis=0)
    return wt, jax.lax.dynamic_update_index_in_dim(errt, e, i, axis=0)

  return jax.lax.fori_loop(start, start + count, column, (wt, errt))


def _sub_width(width: int, m: int) -> int:
  """Columns per sub-block: the largest divisor of ``width`` that is at most :data:`_SUB_COLUMNS` and a multiple of
  the N:M group ``m`` (``width`` itself when there is none)."""
  for sub in range(min(_SUB_COLUMNS, width), 0, -1):
    if width % sub == 0 and sub % m == 0:
      return sub
  return width


def _prune_block(w1, u1, count, d_valid, pattern, ties):
  """Selects the mask of one block and runs its column updates. Returns ``(q1, err1, mask1)``, ``(d_out, B)``.

  ``count``: number to prune jointly over the block (unstructured); ``d_valid``: real (unpadded) columns.

  The columns run in sub-blocks of :func:`_sub_width` columns: inside a sub-block, column by column
  (:func:`_obs_columns`); after it, the later columns of the block absorb the sub-block's
  errors in one product, as the blocks do for the later blocks. This is the same arithmetic as one rank-1
  update of the whole block per column, regrouped, and touches ``B / sub`` times less memory per column.
  """
  width = w1.shape[1]
  inv_d2 = 1.0 / jnp.square(jnp.diag(u1))
  nm = isinstance(pattern, NM)
  m = pattern.m if nm else 1
  sub = _sub_width(width, m)
  if nm:
    maskt = jnp.ones_like(w1.T, dtype=bool)
  else:
    scores = jnp.where(jnp.arange(width)[None, :] < d_valid, jnp.square(w1) * inv_d2[None, :], jnp.inf)
    maskt = layer_mask(scores, count, ties=ties).T

  def sub_block(k, carry):
    wt, errt, maskt = carry
    i1 = k * sub
    u_rows = jax.lax.dynamic_slice_in_dim(u1, i1, sub, axis=0)
    uss = jax.lax.dynamic_slice_in_dim(u_rows, i1, sub, axis=1)
    ws = jax.lax.dynamic_slice_in_dim(wt, i1, sub, axis=0)
    ms = jax.lax.dynamic_slice_in_dim(maskt, i1, sub, axis=0)
    es = jnp.zeros_like(ws)
    if nm:
      ds = jax.lax.dynamic_slice_in_dim(inv_d2, i1, sub)

      def group(g, carry):
        """The mask of group ``g`` from its weights updated so far, then its columns."""
        ws, es, ms = carry
        wg = jax.lax.dynamic_slice_in_dim(ws, g * m, m, axis=0)
        scores = jnp.square(wg) * jax.lax.dynamic_slice_in_dim(ds, g * m, m)[:, None]
        ms = jax.lax.dynamic_update_slice_in_dim(ms, nm_mask(scores.T, n=pattern.n, m=m).T, g * m, axis=0)
        return (*_obs_columns(ws, es, uss, ms, g * m, m), ms)

      qs, es, ms = jax.lax.fori_loop(0, sub // m, group, (ws, es, ms))
    else:
      qs, es = _obs_columns(ws, es, uss, ms, 0, sub)
    if sub < width:  # the later columns of the block (U is upper: rows of the sub-block hold nothing before it)
      later = jnp.where(jnp.arange(width)[None, :] >= i1 + sub, u_rows, 0)
      wt = wt - jnp.matmul(later.T, es, precision=HIGHEST)
    wt = jax.lax.dynamic_update_slice_in_dim(wt, qs, i1, axis=0)
    errt = jax.lax.dynamic_update_slice_in_dim(errt, es, i1, axis=0)
    return wt, errt, jax.lax.dynamic_update_slice_in_dim(maskt, ms, i1, axis=0)

  wt, errt, maskt = jax.lax.fori_loop(0, width // sub, sub_block, (w1.T, jnp.zeros_like(w1.T), maskt))
  return wt.T, errt.T, maskt.T


def _check_factor_hparams(blocksize, percdamp, max_retries):
  if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
    raise JaxpruneError(f"sparsegpt: blocksize must be a positive integer, got {blocksize!r}")
  if not isinstance(percdamp, numbers.Real) or not 0 <= percdamp < float("inf"):
    raise JaxpruneError(f"sparsegpt: percdamp must be a finite number >= 0, got {percdamp!r}")
  if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
    raise JaxpruneError(f"sparsegpt: max_retries must be an integer >= 0, got {max_retries!r}")


def _check_hparams(pattern, blocksize, percdamp, max_retries):
  _check_factor_hparams(blocksize, percdamp, max_retries)
  if isinstance(pattern, NM) and blocksize % pattern.m:
    raise JaxpruneError(f"sparsegpt: blocksize {blocksize} must be a multiple of the N:M group {pattern.m}")
  if isinstance(pattern, Unstructured) and pattern.scope is not None:
    raise JaxpruneError(f"sparsegpt selects its mask per column block; scope={pattern.scope!r} is not supported")


class SparseGPTFactor(NamedTuple):
  """What SparseGPT derives from the statistics alone, the same for every linear reading the same inputs
  (:func:`sparsegpt_prepare`): ``u``, the upper factor of ``(G + δI)⁻¹`` padded with identity rows and columns to
  whole column blocks (:func:`inverse_cholesky_upper`); ``damp``, the ``δ`` of the factorisation it comes from;
  ``factored``, whether a factorisation succeeded (``False``: ``u`` is the ``diag(G)^(-1/2)`` fallback)."""

  u: jax.Array
  damp: jax.Array
  factored: jax.Array


def _factor(gram: jax.Array, *, blocksize: int, percdamp: float, max_retries: int) -> SparseGPTFactor:
  d_in = gram.shape[0]
  pad = -(-d_in // blocksize) * blocksize - d_in
  return SparseGPTFactor(*_inverse_cholesky_upper(gram, percdamp=percdamp, max_retries=max_retries, pad=pad))


@functools.partial(jax.jit, static_argnames=("blocksize", "percdamp", "max_retries"))
def sparsegpt_prepare(stats: Stats, *, blocksize: int = 128, percdamp: float = 0.01,
                      max_retries: int = 6) -> SparseGPTFactor:
  """The :class:`SparseGPTFactor` of ``stats.gram`` ``(d_in, d_in)`` that :func:`sparsegpt` computes first, for
  linears that read the same inputs (a block's q/k/v, its gate/up) to share: ``sparsegpt(w, stats, prepared=factor)``
  with the same ``blocksize``, ``percdamp`` and ``max_retries`` gives what ``sparsegpt(w, stats)`` gives, without
  factorising again (about half of SparseGPT's time at widths of a few hundred to a few thousand)."""
  check_gram("sparsegpt", stats)
  _check_factor_hparams(blocksize, percdamp, max_retries)
  gram = stats.gram
  return _factor(gram.astype(compute_dtype(gram)), blocksize=blocksize, percdamp=percdamp, max_retries=max_retries)


@functools.partial(jax.jit, static_argnames=("pattern", "blocksize", "percdamp", "max_retries", "ties", "with_error"))
def sparsegpt(w: jax.Array, stats: Stats, *, pattern: Unstructured | NM, blocksize: int = 128,
              percdamp: float = 0.01, max_retries: int = 6, ties: str = "count",
              with_error: bool = True, prepared: SparseGPTFactor | None = None) -> SolverResult:
  """Prunes ``w`` ``(d_out, d_in)`` with SparseGPT on ``stats.gram`` ``(d_in, d_in)`` (any positive scale).

  Args:
    w: weights, any float dtype (computed in float32; float64 under x64).
    stats: calibration statistics with a Gram matrix.
    pattern: ``Unstructured`` (scope ``None``: per column block, jointly over rows) or ``NM``.
    blocksize: columns per block (a multiple of ``m`` for N:M); ``d_in`` need not be a multiple.
    percdamp: damping relative to ``mean(diag H)``.
    max_retries: Cholesky retries with 10x damping.
    ties: ``"count"`` (exactly ``floor(s·n)`` per block) or ``"threshold"`` (the reference's rule); unstructured.
    with_error: whether to return the reconstruction error (else ``error`` is ``None``).
    prepared: the :class:`SparseGPTFactor` of ``stats`` from :func:`sparsegpt_prepare` with the same
      ``blocksize``, ``percdamp`` and ``max_retries`` (default: computed here).
  """
  check_inputs("sparsegpt", w, stats, pattern, needs="gram")
  check_ties("sparsegpt", ties, pattern)
  check_with_error(with_error)
  _check_hparams(pattern, blocksize, percdamp, max_retries)
  dtype = compute_dtype(w)
  d_out, d_in = w.shape
  h = stats.gram.astype(dtype)
  dead = jnp.diag(h) == 0
  n_blocks = -(-d_in // blocksize)
  pad = n_blocks * blocksize - d_in
  w_live = jnp.where(dead[None, :], 0, w.astype(dtype))
  if prepared is None:
    prepared = _factor(h, blocksize=blocksize, percdamp=percdamp, max_retries=max_retries)
  elif prepared.u.shape != (d_in + pad,) * 2:
    raise JaxpruneError(f"sparsegpt: a prepared factor of shape {prepared.u.shape} does not fit weights {w.shape} "
                        f"with blocksize {blocksize} (it needs {(d_in + pad,) * 2})")
  u, damp, factored = prepared.u.astype(dtype), prepared.damp.astype(dtype), prepared.factored
  sparsity = pattern.sparsity if isinstance(pattern, Unstructured) else 0.0
  counts = jnp.asarray(
      [num_pruned(d_out * min(blocksize, d_in - b * blocksize), sparsity) for b in range(n_blocks)], jnp.int32)

  def block(b, carry):
    w0, mask, err_sq = carry
    i1 = b * blocksize
    u_rows = jax.lax.dynamic_slice_in_dim(u, i1, blocksize, axis=0)
    w1 = jax.lax.dynamic_slice_in_dim(w0, i1, blocksize, axis=1)
    u1 = jax.lax.dynamic_slice_in_dim(u_rows, i1, blocksize, axis=1)
    q1, err1, mask1 = _prune_block(w1, u1, counts[b], d_in - i1, pattern, ties)
    w0 = w0 - jnp.matmul(err1, u_rows, precision=HIGHEST)  # U is upper: only columns >= i1 change
    w0 = jax.lax.dynamic_update_slice_in_dim(w0, q1, i1, axis=1)
    return w0, jax.lax.dynamic_update_slice_in_dim(mask, mask1, i1, axis=1), err_sq + jnp.sum(jnp.square(err1))

  w0 = jnp.pad(w_live, ((0, 0), (0, pad)))
  w0, mask, err_sq = jax.lax.fori_loop(0, n_blocks, block, (w0, jnp.ones_like(w0, dtype=bool), jnp.zeros((), dtype)))
  w_new, mask = w0[:, :d_in], mask[:, :d_in]
  if not with_error or w.dtype != dtype:  # weights rounded to a narrower dtype: the error of what is returned
    return finish(w, w_new, mask, stats, with_error=with_error)
  # The update is W - Ŵ = E·U (E: the scaled errors of the columns, U: the factor of (G + δI)⁻¹ = UᵀU), so
  # tr((W - Ŵ)(G + δI)(W - Ŵ)ᵀ) = ‖E‖²: the error needs no d_out × d_in × d_in product. Dead inputs (zero rows
  # and columns of G) are zeroed before the update and left alone by it, so they add nothing on either side.
  error = jax.lax.cond(factored, lambda: (err_sq - damp * jnp.sum(jnp.square(w_live - w_new))).astype(jnp.float32),
                       lambda: reconstruction_error(w, w_new, stats))
  return SolverResult(w=w_new, mask=mask, error=error)
