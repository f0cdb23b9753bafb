"""Float64 NumPy references of the pruning solvers, written from the papers and the reference repositories.

Independent of the JAX code: plain loops in the reference layouts (SparseGPT column by column, ADMM in the
``(d_in, d_out)`` layout with an explicit inverse), selection by a stable ``argsort``. Shared conventions:
weights ``(d_out, d_in)``, masks ``True`` = kept, ``nm=(n, m)`` keeps ``n`` of every ``m`` consecutive inputs,
and among equal scores the lower flat index (row-major over ``(d_out, d_in)``) is pruned first.
Each function returns ``(w_new, keep_mask)``.
"""
from __future__ import annotations

import contextlib

import numpy as np

_margins: list[float] | None = None


@contextlib.contextmanager
def selection_margins():
  """Records, for every selection made inside the block, the gap between the highest pruned and the lowest kept
  score relative to the largest finite score; yields the list of those gaps."""
  global _margins
  _margins, outer = [], _margins
  try:
    yield _margins
  finally:
    _margins = outer


def lowest_pruned(scores: np.ndarray, k: int) -> np.ndarray:
  """Keep mask of a 1-D ``scores`` with its ``k`` lowest pruned (first ``k`` of a stable ascending sort)."""
  order = np.argsort(scores, kind="stable")
  keep = np.ones(scores.size, bool)
  keep[order[:k]] = False
  if _margins is not None and 0 < k < scores.size:
    finite = np.abs(scores[np.isfinite(scores)])
    scale = finite.max() if finite.size and finite.max() > 0 else 1.0
    _margins.append(float((scores[order[k]] - scores[order[k - 1]]) / scale))
  return keep


def unstructured_keep(scores: np.ndarray, sparsity: float, scope: str, ties: str = "count") -> np.ndarray:
  """``int(s·size)`` pruned over the whole matrix (``"layer"``) or ``int(s·d_in)`` in each row (``"row"``).

  ``ties="threshold"`` (layer scope): the reference codes' ``scores <= sort(scores)[int(s·size)]``.
  """
  if ties == "threshold":
    return scores > np.sort(scores.ravel())[int(scores.size * sparsity)]
  if scope == "layer":
    return lowest_pruned(scores.ravel(), int(scores.size * sparsity)).reshape(scores.shape)
  k = int(scores.shape[1] * sparsity)
  return np.stack([lowest_pruned(row, k) for row in scores])


def nm_keep(scores: np.ndarray, n: int, m: int) -> np.ndarray:
  """In every row, in every group of ``m`` consecutive columns, the ``m - n`` lowest are pruned."""
  keep = np.ones(scores.shape, bool)
  for r in range(scores.shape[0]):
    for g in range(0, scores.shape[1], m):
      keep[r, g:g + m] = lowest_pruned(scores[r, g:g + m], m - n)
  return keep


def _select(scores, sparsity, nm, scope, ties="count"):
  return nm_keep(scores, *nm) if nm is not None else unstructured_keep(scores, sparsity, scope, ties)


def error(w: np.ndarray, w_hat: np.ndarray, gram: np.ndarray) -> float:
  """``tr((W − Ŵ) G (W − Ŵ)ᵀ)`` in float64."""
  delta = w.astype(np.float64) - w_hat.astype(np.float64)
  return float(np.trace(delta @ gram.astype(np.float64) @ delta.T))


def magnitude(w, *, sparsity=None, nm=None, scope="layer", ties="count"):
  """Magnitude pruning: lowest ``|W|``, no update."""
  keep = _select(np.abs(w.astype(np.float64)), sparsity, nm, scope, ties)
  return np.where(keep, w, 0.0), keep


def wanda(w, sq_norms, *, sparsity=None, nm=None, scope="row"):
  """Wanda (Sun et al. 2023): lowest ``|W_ij|·sqrt(Σ_t x_tj²)``, no update."""
  scores = np.abs(w.astype(np.float64)) * np.sqrt(sq_norms.astype(np.float64))[None, :]
  keep = _select(scores, sparsity, nm, scope)
  return np.where(keep, w, 0.0), keep


def sparsegpt(w, gram, *, sparsity=None, nm=None, blocksize=128, percdamp=0.01, ties="count"):
  """SparseGPT (Frantar & Alistarh 2023, Algorithm 1 as in IST-DASLab/sparsegpt ``fasterprune``)."""
  W = w.astype(np.float64).copy()
  H = gram.astype(np.float64).copy()
  d_out, d_in = W.shape
  dead = np.diag(H) == 0
  H[dead, dead] = 1.0
  W[:, dead] = 0.0
  H += percdamp * np.mean(np.diag(H)) * np.eye(d_in)
  U = np.linalg.cholesky(np.linalg.inv(H)).T
  keep = np.ones(W.shape, bool)
  for i1 in range(0, d_in, blocksize):
    i2 = min(i1 + blocksize, d_in)
    W1, U1 = W[:, i1:i2].copy(), U[i1:i2, i1:i2]
    E1 = np.zeros_like(W1)
    d2 = np.diag(U1) ** 2
    if nm is None:
      keep1 = unstructured_keep(W1 ** 2 / d2[None, :], sparsity, "layer", ties)
    else:
      keep1 = np.ones(W1.shape, bool)
    for i in range(i2 - i1):
      if nm is not None and i % nm[1] == 0:
        j = i + nm[1]
        keep1[:, i:j] = nm_keep(W1[:, i:j] ** 2 / d2[None, i:j], *nm)
      q = np.where(keep1[:, i], W1[:, i], 0.0)
      e = (W1[:, i] - q) / U1[i, i]
      W1[:, i:] -= np.outer(e, U1[i, i:])
      W1[:, i] = q
      E1[:, i] = e
    W[:, i1:i2] = W1
    W[:, i2:] -= E1 @ U[i1:i2, i2:]
    keep[:, i1:i2] = keep1
  return W, keep


def _admm(w, gram, select, mask, *, rho, percdamp, iterations, mask_iterations):
  """The loop of fmfi-compbio/admm-pruning ``lib/admm.py`` in its ``(d_in, d_out)`` layout.

  ``select(k, scores)`` takes and returns ``(d_out, d_in)`` arrays (``k=None``: the final pattern).
  """
  XX = gram.astype(np.float64).copy()
  norm = np.sqrt(np.diag(XX)) + 1e-8
  XX = (XX / norm).T / norm
  W = (w.astype(np.float64) * norm).T
  XX += percdamp * np.mean(np.diag(XX)) * np.eye(len(norm))
  XY = XX @ W
  K = np.linalg.inv(XX + rho * np.eye(len(norm)))
  U = np.zeros_like(W)
  if mask is None:
    mask = select(None, np.abs(W).T).T
  for k in range(iterations):
    if k < mask_iterations:
      mask = select(k, np.abs(W + U).T).T
    Z = (W + U) * mask
    U = U + W - Z
    W = K @ (XY + rho * (Z - U))
  Z = (W + U) * mask
  return (Z.T / norm), mask.T.copy()


def admm_update(w, gram, mask, *, rho=1.0, percdamp=0.1, iterations=20):
  """ADMM weight update on a fixed keep mask (Boža 2024)."""
  return _admm(w, gram, None, mask.T.astype(bool), rho=rho, percdamp=percdamp, iterations=iterations,
               mask_iterations=0)


def admm(w, gram, *, sparsity=None, nm=None, scope="row", rho=1.0, percdamp=0.1, iterations=20,
         mask_iterations=15, schedule="cubic"):
  """ADMM-Grad (Boža 2024): cubic schedule ``s_k = s − s(1 − (k+1)/K)³`` over ``K = mask_iterations``.

  N:M: in each row, among the entries the N:M rule prunes now, the ``int(P·(1 − (1 − (k+1)/K)³))`` lowest are
  pruned, ``P`` the row's final number pruned. ``schedule="final"`` selects the final pattern at every mask iteration.
  """

  def select(k, scores):
    if k is None or schedule == "final":
      return _select(scores, sparsity, nm, scope)
    c = (1.0 - (k + 1) / mask_iterations) ** 3
    if nm is None:
      return unstructured_keep(scores, sparsity - sparsity * c, scope)
    n, m = nm
    candidates = ~nm_keep(scores, n, m)
    pruned = scores.shape[1] // m * (m - n)
    return np.stack([lowest_pruned(row, int(pruned * (1.0 - c))) for row in np.where(candidates, scores, np.inf)])

  return _admm(w, gram, select, None, rho=rho, percdamp=percdamp, iterations=iterations,
               mask_iterations=mask_iterations)
