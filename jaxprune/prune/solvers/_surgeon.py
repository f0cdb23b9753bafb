"""LLM Surgeon: pruning under a Kronecker-factored Fisher (van der Ouderaa et al. 2024, arXiv:2312.17244).

Pure solver math (github Qualcomm-AI-research/llm-surgeon, ``pruner.py``, curvature of Kronecker rank 1). For a
linear ``y = W x`` with ``W`` ``(d_out, d_in)`` the Fisher is approximated by ``F = G ⊗ A``, ``A = E[a aᵀ]``
``(d_in, d_in)`` over its inputs and ``G = E[g gᵀ]`` ``(d_out, d_out)`` over the loss gradients at its outputs.

**Vec ordering.** ``vec(W)`` is row-major (``W.ravel()``, entry ``(i, j)`` at ``i · d_in + j``). Then
``F = np.kron(G, A)``, ``½ vec(ΔW)ᵀ F vec(ΔW) = ½ tr(ΔWᵀ G ΔW A)`` and ``[F⁻¹]_{(i,j),(k,l)} = [G⁻¹]_ik [A⁻¹]_jl``.
(A column-major vec pairs with ``A ⊗ G``; the matrix formulas below are the same.)

**OBS.** Removing a set ``Q`` of weights: ``min ½ δᵀFδ`` subject to ``(w + δ)_Q = 0`` gives
``δ = −F⁻¹ E_Qᵀ ([F⁻¹]_QQ)⁻¹ w_Q`` at cost ``½ w_Qᵀ ([F⁻¹]_QQ)⁻¹ w_Q``; rows, columns and elements have the
closed forms of :func:`remove_rows`, :func:`remove_columns`, :func:`remove_elements` and the costs of
:func:`row_costs`, :func:`column_costs`, :func:`element_costs` (single removals).

**Dynamic masks under jit.** Masks are bool arrays of static shape, ``True`` = kept (removed = ``False``). A
principal submatrix ``M_SS`` over a masked set ``S`` is embedded at full size as ``where(s_i & s_j, M_ij, δ_ij)``
with the right-hand side zeroed off ``S``; that SPD system (one Cholesky) returns ``(M_SS)⁻¹ b_S`` on ``S`` and
0 elsewhere, so no shape depends on a mask. The update helpers compute in float32 with ``HIGHEST`` precision
(float64 for float64 inputs) and return that dtype; :func:`surgeon` casts back to the input dtype.

**Global allocation** (:func:`global_threshold`) is host NumPy code, run once per shot.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import JaxpruneError
from jaxprune.prune import NM, SolverResult, Unstructured, num_pruned, pattern_mask

HIGHEST = jax.lax.Precision.HIGHEST


def _dtype(x: jax.Array):
  return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=HIGHEST)


def _check_square(name: str, m: jax.Array, d: int, what: str) -> None:
  if m.shape != (d, d):
    raise JaxpruneError(f"{name}: {what} must be ({d}, {d}) to fit the weights, got shape {m.shape}")


def _check_mask(name: str, mask: jax.Array, shape: tuple[int, ...]) -> None:
  if mask.shape != shape or mask.dtype != jnp.bool_:
    raise JaxpruneError(f"{name}: mask must be bool of shape {shape}, got {mask.dtype} {mask.shape}")


def damped_inverse(m: jax.Array, *, damping: float) -> jax.Array:
  """``(M + δI)⁻¹`` with ``δ = damping · mean(diag M)`` (relative damping, as SparseGPT), via Cholesky.

  Args:
    m: ``(d, d)`` symmetric positive semi-definite (``A`` or ``G``); ``damping > 0`` makes it definite.
  Returns:
    ``(d, d)`` symmetric inverse in float32 (float64 for a float64 ``m``); NaN if ``M + δI`` is not definite.
  """
  dtype = _dtype(m)
  m = m.astype(dtype)
  eye = jnp.eye(m.shape[0], dtype=dtype)
  lower = jnp.linalg.cholesky(m + damping * jnp.mean(jnp.diag(m)) * eye)
  inv = jax.scipy.linalg.cho_solve((lower, True), eye)
  return 0.5 * (inv + inv.T)


def kron_quadratic(delta: jax.Array, a: jax.Array, g: jax.Array) -> jax.Array:
  """``½ vec(ΔW)ᵀ (G ⊗ A) vec(ΔW) = ½ tr(ΔWᵀ G ΔW A)``: ``delta`` ``(d_out, d_in)``, ``a`` ``(d_in, d_in)``,
  ``g`` ``(d_out, d_out)``; a scalar in the compute dtype."""
  dtype = _dtype(delta)
  delta = delta.astype(dtype)
  return 0.5 * jnp.sum(_mm(_mm(g.astype(dtype), delta), a.astype(dtype)) * delta)


# ---------------------------------------------------------------- costs of single removals (OBS)


def element_costs(w: jax.Array, a_inv_diag: jax.Array, g_inv_diag: jax.Array) -> jax.Array:
  """``½ W_ij² / ([G⁻¹]_ii [A⁻¹]_jj)`` ``(d_out, d_in)``: the OBS cost of removing weight ``(i, j)`` alone.

  ``a_inv_diag`` ``(d_in,)``, ``g_inv_diag`` ``(d_out,)``: diagonals of the (damped) inverses.
  """
  dtype = _dtype(w)
  w = w.astype(dtype)
  return 0.5 * w * w / (g_inv_diag.astype(dtype)[:, None] * a_inv_diag.astype(dtype)[None, :])


def row_costs(w: jax.Array, a: jax.Array, g_inv: jax.Array) -> jax.Array:
  """``½ W_r A W_rᵀ / [G⁻¹]_rr`` ``(d_out,)``: the OBS cost of removing output row ``r`` alone.

  ``a`` ``(d_in, d_in)``, ``g_inv`` ``(d_out, d_out)``.
  """
  dtype = _dtype(w)
  w = w.astype(dtype)
  return 0.5 * jnp.sum(_mm(w, a.astype(dtype)) * w, axis=1) / jnp.diag(g_inv).astype(dtype)


def column_costs(w: jax.Array, g: jax.Array, a_inv: jax.Array) -> jax.Array:
  """``½ W_cᵀ G W_c / [A⁻¹]_cc`` ``(d_in,)``: the OBS cost of removing input column ``c`` alone.

  ``g`` ``(d_out, d_out)``, ``a_inv`` ``(d_in, d_in)``.
  """
  dtype = _dtype(w)
  w = w.astype(dtype)
  return 0.5 * jnp.sum(_mm(g.astype(dtype), w) * w, axis=0) / jnp.diag(a_inv).astype(dtype)


def _diagonal_blocks(m: jax.Array, size: int, count: int) -> jax.Array:
  """The ``count`` leading ``(size, size)`` diagonal blocks of ``m``: ``(count, size, size)``."""
  idx = jnp.arange(count * size).reshape(count, size)
  return m[idx[:, :, None], idx[:, None, :]]


def row_block_costs(w: jax.Array, a: jax.Array, g_inv: jax.Array, *, size: int) -> jax.Array:
  """``½ tr(([G⁻¹]_BB)⁻¹ W_B A W_Bᵀ)`` ``(d_out / size,)``: the OBS cost of removing the ``size`` consecutive rows
  ``B`` of each block together (a head's rows of ``q``, ``k`` or ``v``; ``size = 1``: :func:`row_costs`).

  ``[F⁻¹]_QQ = [G⁻¹]_BB ⊗ A⁻¹`` for ``Q`` the whole rows ``B``, so ``½ w_Qᵀ ([F⁻¹]_QQ)⁻¹ w_Q`` is the trace above.
  ``w`` ``(d_out, d_in)`` with ``d_out`` divisible by ``size``, ``a`` ``(d_in, d_in)``, ``g_inv`` ``(d_out, d_out)``.
  """
  dtype = _dtype(w)
  w = w.astype(dtype)
  count = w.shape[0] // size
  wa = _mm(w, a.astype(dtype)).reshape(count, size, -1)
  m = jnp.einsum("nid,njd->nij", wa, w.reshape(count, size, -1), precision=HIGHEST)  # W_B A W_Bᵀ
  x = jnp.linalg.solve(_diagonal_blocks(g_inv.astype(dtype), size, count), m)
  return 0.5 * jnp.trace(x, axis1=1, axis2=2)


def column_block_costs(w: jax.Array, g: jax.Array, a_inv: jax.Array, *, size: int, count: int) -> jax.Array:
  """``½ tr(([A⁻¹]_CC)⁻¹ W_Cᵀ G W_C)`` ``(count,)``: the OBS cost of removing the ``size`` consecutive columns ``C``
  of each of the ``count`` leading blocks together (a group of heads' columns of ``o_proj``; ``size = 1``:
  :func:`column_costs`). ``w`` ``(d_out, d_in)`` with ``count · size <= d_in`` (a bias column stays out),
  ``g`` ``(d_out, d_out)``, ``a_inv`` ``(d_in, d_in)``."""
  dtype = _dtype(w)
  w = w.astype(dtype)
  gw = _mm(g.astype(dtype), w)[:, :count * size].reshape(-1, count, size)
  m = jnp.einsum("dni,dnj->nij", w[:, :count * size].reshape(-1, count, size), gw, precision=HIGHEST)
  x = jnp.linalg.solve(_diagonal_blocks(a_inv.astype(dtype), size, count), m)
  return 0.5 * jnp.trace(x, axis1=1, axis2=2)


# ---------------------------------------------------------------- weight updates


def _masked_solve(m: jax.Array, sel: jax.Array, b: jax.Array) -> jax.Array:
  """``x`` ``(n, k)`` with ``x_S = (M_SS)⁻¹ b_S`` and ``x = 0`` off ``S = {sel}``; ``m`` ``(n, n)`` SPD on ``S``."""
  both = sel[:, None] & sel[None, :]
  lower = jnp.linalg.cholesky(jnp.where(both, m, jnp.eye(m.shape[0], dtype=m.dtype)))
  x = jax.scipy.linalg.cho_solve((lower, True), jnp.where(sel[:, None], b, 0))
  return jnp.where(sel[:, None], x, 0)


def remove_rows(w: jax.Array, g_inv: jax.Array, rows_mask: jax.Array) -> jax.Array:
  """Removes the rows ``R`` (``rows_mask == False``): ``ΔW = −G⁻¹_{:,R} ([G⁻¹]_RR)⁻¹ W_R``.

  The optimal update of the kept rows under ``F = G ⊗ A`` (``A`` cancels). ``w`` ``(d_out, d_in)``, ``g_inv``
  ``(d_out, d_out)``, ``rows_mask`` ``(d_out,)`` bool. Returns the updated ``(d_out, d_in)``, removed rows 0.
  """
  _check_square("remove_rows", g_inv, w.shape[0], "g_inv")
  _check_mask("remove_rows", rows_mask, (w.shape[0],))
  dtype = _dtype(w)
  w, g_inv, removed = w.astype(dtype), g_inv.astype(dtype), ~rows_mask
  x = _masked_solve(g_inv, removed, w)  # ([G⁻¹]_RR)⁻¹ W_R on R, 0 elsewhere
  return jnp.where(removed[:, None], 0, w - _mm(g_inv, x))


def remove_columns(w: jax.Array, a_inv: jax.Array, cols_mask: jax.Array) -> jax.Array:
  """Removes the columns ``C`` (``cols_mask == False``): ``ΔW = −W_{:,C} ([A⁻¹]_CC)⁻¹ A⁻¹_{C,:}``.

  The optimal update under ``F = G ⊗ A`` (``G`` cancels). ``w`` ``(d_out, d_in)``, ``a_inv`` ``(d_in, d_in)``
  symmetric, ``cols_mask`` ``(d_in,)`` bool. Returns the updated ``(d_out, d_in)``, removed columns 0.
  """
  _check_square("remove_columns", a_inv, w.shape[1], "a_inv")
  _check_mask("remove_columns", cols_mask, (w.shape[1],))
  dtype = _dtype(w)
  w, a_inv, removed = w.astype(dtype), a_inv.astype(dtype), ~cols_mask
  y = _masked_solve(a_inv, removed, w.T).T  # W_C ([A⁻¹]_CC)⁻¹ on C, 0 elsewhere
  return jnp.where(removed[None, :], 0, w - _mm(y, a_inv))


def remove_rows_columns(w: jax.Array, a_inv: jax.Array, g_inv: jax.Array, rows_mask: jax.Array,
                        cols_mask: jax.Array) -> jax.Array:
  """Removes rows ``R`` and columns ``C`` together: :func:`remove_rows`, then :func:`remove_columns`.

  The weights left, ``{W' : W'_R = 0, W'_{:,C} = 0}``, are the tensor product of ``{u : u_R = 0}`` and
  ``{v : v_C = 0}``; under ``F = G ⊗ A`` the orthogonal projection onto it is the product of the ``G``-projection
  of the rows and the ``A``-projection of the columns, so the two closed forms in turn give the exact joint
  minimiser of ``½ vec(ΔW)ᵀ F vec(ΔW)``. Shapes as :func:`remove_rows` and :func:`remove_columns`.
  """
  return remove_columns(remove_rows(w, g_inv, rows_mask), a_inv, cols_mask)


def remove_elements(w: jax.Array, a_inv: jax.Array, g_inv: jax.Array, mask: jax.Array, *,
                    chunk: int = 2000) -> jax.Array:
  """Correlated OBS update removing the weights where ``mask`` is ``False``, in chunks (LLM Surgeon).

  The removed weights are taken in row-major order, ``chunk`` at a time. For a chunk ``Q`` with current values
  ``w_Q`` (including the updates of earlier chunks), ``C = [G⁻¹]_{r_Q r_Q} ∘ [A⁻¹]_{c_Q c_Q}`` ``(q, q)`` (the
  ``Q`` block of ``F⁻¹``), ``x = C⁻¹ w_Q`` and ``ΔW = −Σ_k x_k G⁻¹_{:, r_k} A⁻¹_{c_k, :}``: the exact
  constrained minimiser for that chunk alone (earlier chunks are not held at 0; a chunk covering every removed
  weight gives the joint optimum). After the last chunk the removed weights are set to exactly 0, as the
  reference code does. The removed indices come first in a stable ``argsort`` of the flat mask; a chunk is a
  fixed ``(chunk,)`` slice of it (slots past the removed count solve ``1 · x = 0``), and ``ceil(count / chunk)``
  chunks run in a ``while_loop``: the mask may be traced.

  Args:
    w: ``(d_out, d_in)`` weights.
    a_inv: ``(d_in, d_in)`` and ``g_inv``: ``(d_out, d_out)`` (damped) inverses of ``A`` and ``G``.
    mask: ``(d_out, d_in)`` bool, ``True`` = kept.
    chunk: removed weights solved jointly (the reference's ``max_correlate``); each costs ``chunk · d_out · d_in``.
  Returns:
    ``(d_out, d_in)`` updated weights, zero where ``mask`` is ``False``.
  """
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
    raise JaxpruneError(f"remove_elements: chunk must be a positive integer, got {chunk!r}")
  if w.ndim != 2:
    raise JaxpruneError(f"remove_elements: weights must be (d_out, d_in), got shape {w.shape}")
  d_out, d_in = w.shape
  _check_square("remove_elements", a_inv, d_in, "a_inv")
  _check_square("remove_elements", g_inv, d_out, "g_inv")
  _check_mask("remove_elements", mask, w.shape)
  dtype, size = _dtype(w), d_out * d_in
  w, a_inv, g_inv = w.astype(dtype), a_inv.astype(dtype), g_inv.astype(dtype)
  chunk = min(chunk, size)
  count = jnp.sum(~mask, dtype=jnp.int32)
  order = jnp.argsort(mask.reshape(-1), stable=True).astype(jnp.int32)  # removed (False) first, row-major
  order = jnp.pad(order, (0, -(-size // chunk) * chunk - size))
  b = min(_WINDOW_ROWS, d_out)
  rows = -(-d_out // b) * b  # padded with zero rows (and zero rows and columns of G⁻¹) to whole windows
  w_p = jnp.pad(w, ((0, rows - d_out), (0, 0)))
  g_p = jnp.pad(g_inv, ((0, rows - d_out), (0, rows - d_out)))

  def g_cols(win):  # (rows, b): the columns of G⁻¹ of window ``win``
    return jax.lax.dynamic_slice_in_dim(g_p, win * b, b, axis=1)

  n_chunks = (count + chunk - 1) // chunk

  def first_row(c):
    return order[jnp.minimum(c, n_chunks - 1) * chunk] // d_in

  def step(carry):  # one chunk
    c, w_p, pending, win = carry
    ids = jax.lax.dynamic_slice_in_dim(order, c * chunk, chunk)
    valid = c * chunk + jnp.arange(chunk, dtype=jnp.int32) < count
    ids = jnp.where(valid, ids, ids[0])
    r, col = ids // d_in, ids % d_in
    current = w_p[r, col] - jnp.sum(g_cols(win)[r] * pending[:, col].T, axis=1)
    c_mat = g_p[r[:, None], r[None, :]] * a_inv[col[:, None], col[None, :]]
    x = _masked_solve(c_mat, valid, current[:, None])[:, 0]
    rows_of = _rows_update(x[:, None] * a_inv[col], b)  # x_k A⁻¹_{c_k,:} summed into window-local rows
    pending = pending + rows_of(jnp.where(r // b == win, r - win * b, b))
    last = jnp.max(jnp.where(valid, r, r[0])) // b

    def beyond(j, w_p):  # rows of this chunk past the window (a chunk longer than the rest of it): now
      blk = win + 1 + j
      return w_p - _mm(g_cols(blk), rows_of(jnp.where(r // b == blk, r - blk * b, b)))

    return c + 1, jax.lax.fori_loop(0, last - win, beyond, w_p), pending, win

  def window(carry):  # the chunks starting in one window, then its update applied to all rows
    c, w_p = carry
    win = first_row(c) // b
    c, w_p, pending, _ = jax.lax.while_loop(lambda s: (s[0] < n_chunks) & (first_row(s[0]) // b == win), step,
                                            (c, w_p, jnp.zeros((b, d_in), dtype), win))
    return c, w_p - _mm(g_cols(win), pending)

  _, w_p = jax.lax.while_loop(lambda s: s[0] < n_chunks, window, (jnp.int32(0), w_p))
  return jnp.where(mask, w_p[:d_out], 0)


# Rows whose update is held back (a window). The chunks of the row-major removed weights run through a few rows
# at a time, and each chunk's update ``G⁻¹_{:, rows} Y_rows`` (``Y_rows = Σ_k x_k A⁻¹_{c_k, :}`` by row) touches
# every row of ``W``. While the chunks stay within ``b`` rows, ``Y`` is summed in a ``(b, d_in)`` buffer (each
# chunk's current values corrected for it by ``G⁻¹_{r_k, window} Y``) and applied to all of ``W`` when the chunks
# leave the window: ``d_out / b`` passes over ``W`` instead of one per chunk; the same sums in another order.
_WINDOW_ROWS = 16


def _rows_update(contrib, b: int):
  """``local -> Y`` ``(b, d_in)``: the rows of ``contrib`` ``(q, d_in)`` summed by their window-local row
  ``local`` ``(q,)`` (``b`` drops a row)."""
  def rows_of(local):
    return jnp.zeros((b + 1, contrib.shape[1]), contrib.dtype).at[local].add(contrib)[:b]
  return rows_of


# ---------------------------------------------------------------- one-shot layer solver (local allocation)


def surgeon(w: jax.Array, a: jax.Array, g: jax.Array, *, pattern: Unstructured | NM, damping_a: float = 0.01,
            damping_g: float = 0.1, chunk: int = 2000) -> SolverResult:
  """One shot of LLM Surgeon on one layer with a local mask: costs, selection, correlated update.

  ``A⁻¹``, ``G⁻¹`` are damped inverses (:func:`damped_inverse`; defaults as the reference scripts); the mask
  prunes the lowest :func:`element_costs` (``Unstructured``: ``floor(s·size)`` per layer, or per row with
  ``scope="row"``; ``NM``: ``m - n`` per group; lower flat index first among ties); then :func:`remove_elements`.

  Args:
    w: ``(d_out, d_in)`` weights, any float dtype (computed in float32; float64 under x64).
    a: ``(d_in, d_in)`` input second moment ``A``; ``g``: ``(d_out, d_out)`` output-gradient second moment ``G``.
    pattern: ``Unstructured`` or ``NM`` (``n`` kept of every ``m``).
  Returns:
    :class:`SolverResult` with ``w`` in the input dtype and ``error = ½ tr(ΔWᵀ G ΔW A)`` (undamped ``A``, ``G``,
    ``ΔW`` = returned minus input weights) as float32.
  """
  if not isinstance(pattern, (Unstructured, NM)):
    raise JaxpruneError(f"surgeon: pattern must be Unstructured or NM, got {pattern!r}")
  if w.ndim != 2:
    raise JaxpruneError(f"surgeon: weights must be (d_out, d_in), got shape {w.shape}")
  pattern.check_width(w.shape[1])
  _check_square("surgeon", a, w.shape[1], "A")
  _check_square("surgeon", g, w.shape[0], "G")
  for name, value in (("damping_a", damping_a), ("damping_g", damping_g)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < float("inf"):
      raise JaxpruneError(f"surgeon: {name} must be a finite number >= 0, got {value!r}")
  dtype = _dtype(w)
  w0 = w.astype(dtype)
  a_inv, g_inv = damped_inverse(a.astype(dtype), damping=damping_a), damped_inverse(g.astype(dtype), damping=damping_g)
  costs = element_costs(w0, jnp.diag(a_inv), jnp.diag(g_inv))
  mask = pattern_mask(costs, pattern, default_scope="layer")
  w_out = remove_elements(w0, a_inv, g_inv, mask, chunk=chunk).astype(w.dtype)
  error = kron_quadratic(w_out.astype(dtype) - w0, a, g)
  return SolverResult(w=w_out, mask=mask, error=error.astype(jnp.float32))


# ---------------------------------------------------------------- global allocation (host, once per shot)


class Allocation(NamedTuple):
  """Result of :func:`global_threshold`; one entry per layer, in the order given.

  Attributes:
    masks: ``(d_out, d_in)`` bool keep masks.
    pruned: number of weights each layer loses.
    sparsities: ``pruned / (d_out · d_in)`` per layer.
    threshold: cost of the costliest candidate pruned (``-inf`` when none): every pruned candidate costs at most
      this, every kept one at least this (ties at it are split by the order rule).
    keep_rows, keep_cols: ``(d_out,)`` / ``(d_in,)`` bool per layer for ``"rows_columns"``, else ``None``.
  """

  masks: tuple[np.ndarray, ...]
  pruned: tuple[int, ...]
  sparsities: tuple[float, ...]
  threshold: float
  keep_rows: tuple[np.ndarray, ...] | None = None
  keep_cols: tuple[np.ndarray, ...] | None = None


def _host(c, ndim: int) -> np.ndarray:
  c = np.asarray(c)
  if c.dtype not in (np.float32, np.float64):  # float32 stays float32: the costs of a whole model, ranked on host
    c = c.astype(np.float64)
  if c.ndim != ndim or np.isnan(c).any():
    raise JaxpruneError(f"global_threshold: costs must be {ndim}-D arrays without NaN, got shape {c.shape}")
  return c


def _prefix(costs: np.ndarray, take: int) -> tuple[np.ndarray, float]:
  """Indices of the ``take`` lowest ``costs`` (lower index first among ties; the set a stable sort's prefix
  holds) and the threshold, the largest cost taken. A partition, not a sort: linear in ``costs.size``."""
  if take <= 0:
    return np.zeros(0, np.int64), -np.inf
  threshold = np.partition(costs, take - 1)[take - 1]
  below = np.flatnonzero(costs < threshold)
  tied = np.flatnonzero(costs == threshold)[:take - below.size]
  return np.concatenate([below, tied]), float(threshold)


def _split(flags: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
  return np.split(flags, np.cumsum(sizes)[:-1])


def global_threshold(costs: Sequence, *, sparsity: float, structure: str | NM = "element",
                     budget: int | None = None) -> Allocation:
  """One cost threshold over all layers that prunes a target fraction of all their weights (LLM Surgeon).

  Candidates of all layers are ranked by cost in one stable sort (among equal costs the earlier layer, then
  the lower row-major index, then rows before columns, goes first) and the longest prefix within the budget
  ``P = floor(sparsity · Σ d_out · d_in)`` is pruned:

  * ``"element"``: ``costs`` are ``(d_out, d_in)`` arrays (:func:`element_costs`); exactly ``P`` weights go.
  * ``NM(n, m)`` (``n`` kept of every ``m`` inputs): a candidate is a group of ``m`` consecutive inputs of a
    row, costing the sum of its ``m - n`` smallest element costs; ``floor(P / (m - n))`` groups lose those
    ``m - n`` weights (lowest first, lower index among ties), the others stay dense. Needs
    ``sparsity <= (m - n) / m`` (all groups pruned).
  * ``"rows_columns"``: ``costs`` are ``(row_costs (d_out,), column_costs (d_in,))`` pairs; removing ``r`` rows
    and ``c`` columns removes ``r·d_in + c·d_out − r·c`` weights, counted exactly in cost order, so the pruned
    total is ``<= P`` and short of it by less than the next candidate's row/column.

  ``budget`` replaces ``P`` by an exact count of weights (``0 <= budget <= Σ d_out · d_in``), e.g. a multi-shot
  schedule's; ``sparsity`` is then only checked. Costs of ``-inf`` mark candidates that must go (pruned before).
  """
  Unstructured(sparsity)  # raises JaxpruneError unless a number in [0, 1)
  if not len(costs):
    raise JaxpruneError("global_threshold: no layers given")
  if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0):
    raise JaxpruneError(f"global_threshold: budget must be an integer >= 0, got {budget!r}")
  if structure == "rows_columns":
    return _rows_columns(costs, sparsity, budget)
  layers = [_host(c, 2) for c in costs]
  total = sum(c.size for c in layers)
  budget = num_pruned(total, sparsity) if budget is None else min(int(budget), total)
  if structure == "element":
    chosen, threshold = _prefix(np.concatenate([c.ravel() for c in layers]), budget)
    keep = np.ones(total, bool)
    keep[chosen] = False
    masks = [k.reshape(c.shape) for k, c in zip(_split(keep, [c.size for c in layers]), layers)]
  elif isinstance(structure, NM):
    masks, threshold = _nm(layers, structure, sparsity, budget)
  else:
    raise JaxpruneError(f"global_threshold: structure must be 'element', 'rows_columns' or an NM, got {structure!r}")
  pruned = tuple(int((~k).sum()) for k in masks)
  return Allocation(tuple(masks), pruned, tuple(p / k.size for p, k in zip(pruned, masks)), threshold)


def _nm(layers: list[np.ndarray], nm: NM, sparsity: float, budget: int):
  """Global N:M: group candidates ``(d_out, d_in / m)`` per layer, the cheapest ``budget // (m - n)`` pruned."""
  if sparsity > nm.sparsity:
    raise JaxpruneError(f"global_threshold: N:M {nm.n}:{nm.m} prunes at most {nm.sparsity:g} of the weights, "
                        f"got sparsity {sparsity:g}")
  for c in layers:
    nm.check_width(c.shape[1])
  k = nm.pruned
  groups = [c.reshape(c.shape[0], -1, nm.m) for c in layers]
  lowest = [np.argsort(gr, axis=-1, kind="stable")[..., :k] for gr in groups]
  group_costs = [np.take_along_axis(gr, lo, -1).sum(-1) for gr, lo in zip(groups, lowest)]
  chosen, threshold = _prefix(np.concatenate([gc.ravel() for gc in group_costs]), budget // k if k else 0)
  hit = np.zeros(sum(gc.size for gc in group_costs), bool)
  hit[chosen] = True
  masks = []
  for gr, lo, h in zip(groups, lowest, _split(hit, [gc.size for gc in group_costs])):
    keep = np.ones(gr.shape, bool)
    np.put_along_axis(keep, lo, ~h.reshape(gr.shape[:2])[..., None], -1)
    masks.append(keep.reshape(gr.shape[0], -1))
  return masks, threshold


def _rows_columns(costs: Sequence, sparsity: float, budget: int | None) -> Allocation:
  """Global rows + columns with exact parameter accounting (see :func:`global_threshold`)."""
  if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in costs):
    raise JaxpruneError("global_threshold: rows_columns needs a (row_costs, column_costs) pair per layer")
  pairs = [(_host(r, 1), _host(c, 1)) for r, c in costs]
  shapes = [(r.size, c.size) for r, c in pairs]
  if budget is None:
    budget = num_pruned(sum(a * b for a, b in shapes), sparsity)
  cand = np.concatenate([np.concatenate([r, c]) for r, c in pairs])
  layer = np.concatenate([np.full(a + b, i) for i, (a, b) in enumerate(shapes)])
  is_col = np.concatenate([np.arange(a + b) >= a for a, b in shapes])
  order = np.argsort(cand, kind="stable")
  lay, col = layer[order], is_col[order].astype(np.int64)
  # Rows/columns of the same layer taken before each candidate: exclusive cumulative counts within each layer.
  by_layer = np.argsort(lay, kind="stable")
  lay_g, col_g = lay[by_layer], col[by_layer]
  cols_before, rows_before = np.cumsum(col_g) - col_g, np.cumsum(1 - col_g) - (1 - col_g)
  start = np.searchsorted(lay_g, lay_g, side="left")
  cols_before, rows_before = cols_before - cols_before[start], rows_before - rows_before[start]
  d_out, d_in = np.array([s[0] for s in shapes]), np.array([s[1] for s in shapes])
  gain = np.empty_like(col)
  gain[by_layer] = np.where(col_g == 1, d_out[lay_g] - rows_before, d_in[lay_g] - cols_before)
  take = int(np.searchsorted(np.cumsum(gain), budget, side="right"))
  removed = np.zeros(cand.size, bool)
  removed[order[:take]] = True
  threshold = float(cand[order[take - 1]]) if take else -np.inf
  keep_rows, keep_cols, masks = [], [], []
  for flags, (a, b) in zip(_split(~removed, [a + b for a, b in shapes]), shapes):
    keep_rows.append(flags[:a])
    keep_cols.append(flags[a:])
    masks.append(np.outer(flags[:a], flags[a:]))
  pruned = tuple(int((~k).sum()) for k in masks)
  return Allocation(tuple(masks), pruned, tuple(p / k.size for p, k in zip(pruned, masks)), threshold,
                    tuple(keep_rows), tuple(keep_cols))
