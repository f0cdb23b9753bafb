"""ADMM weight update and gradual ADMM pruning (Boža 2024, "Fast and Effective Weight Update for Pruned Large
Language Models", arXiv:2401.02938; reference fmfi-compbio/admm-pruning ``lib/admm.py``).

Solves ``min ‖X Wᵀ − X Ŵᵀ‖²`` with ``Ŵ`` zero outside a mask by ADMM, as the reference does (here in the
``(d_out, d_in)`` layout, so that rows stay independent and can be sharded):

* ``n = sqrt(diag G) + 1e-8``; ``H = D⁻¹ G D⁻¹`` (unit diagonal); ``W0 = W D`` (``D = diag(n)``);
* ``H_λ = H + λI``, ``λ = percdamp · mean(diag H)``; ``B = W0 H_λ``; ``K = (H_λ + ρI)⁻¹`` once (Cholesky;
  ``n``, ``H_λ`` and ``K`` depend on the statistics alone: :func:`admm_prepare` computes them once for the linears
  that read the same inputs, and ``prepared=`` hands them to each);
* from ``W = W0, U = 0``, each iteration: ``Z = (W + U) ⊙ M``, ``U += W − Z``, ``W = (B + ρ(Z − U)) K``;
* ``Ŵ = ((W + U) ⊙ M) D⁻¹``.

Mask schedules of :func:`admm` during the first ``mask_iterations`` iterations (the mask is then frozen):

* ``"cubic"`` (the paper's ADMM-Grad): at iteration ``k`` keep the largest ``|W + U|`` at sparsity
  ``s_k = s − s·(1 − (k+1)/K)³`` (``K = mask_iterations``), so the last mask iteration reaches ``s`` exactly.
  N:M has a real gradual variant for any N:M: at iteration ``k``, in each row, among the entries the N:M rule
  would prune now (the ``m − n`` lowest ``|W + U|`` of each group), the ``floor(f_k · P)`` lowest are pruned,
  where ``P = d_in·(m−n)/m`` and ``f_k = 1 − (1 − (k+1)/K)³``; the last mask iteration is exact N:M. (The
  reference's N:M path ranks these candidates over the whole matrix, and for 2:4 only: whatever N:M is asked it
  produces 2:4 at 50 %. Candidates are ranked per row here, as for unstructured sparsity below.)
* ``"final"``: select at the final sparsity (or the full N:M rule) every iteration. For unstructured
  sparsity this reproduces the reference code's default path, which computes ``s_k`` but never uses it.

Unstructured ranking scope: per output row unless the pattern says ``scope="layer"``. The reference code has
both: its default ranks over the whole matrix and selects at the final sparsity every iteration (defect 1 above);
its ``per_out`` path ranks per row and is the one that runs the cubic schedule. Per row is the default here,
as Wanda found for per-row ranking (the comparison on SmolLM2-135M: ``experiments/notes``).

With ``mask_iterations=0`` the mask is chosen once from ``|W0| = |W|·‖X_j‖``: Wanda's ranking (same mask).
"""
from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxprune.errors import JaxpruneError
from jaxprune.prune._masks import keep_mask, layer_mask, nm_mask, num_pruned, pattern_mask
from jaxprune.prune._patterns import NM, Unstructured
from jaxprune.prune.solvers._base import HIGHEST, SolverResult, check_gram, check_inputs, compute_dtype, finish
from jaxprune.prune._stats import Stats

SCHEDULES = ("cubic", "final")
DEFAULT_SCOPE = "row"  # unstructured ranking when the pattern leaves it open (see the module docstring)


class ADMMFactor(NamedTuple):
  """What ADMM derives from the statistics alone, the same for every linear reading the same inputs
  (:func:`admm_prepare`): ``h_lam`` ``(d_in, d_in)`` (``H_λ``), ``k_t`` (``Kᵀ``) and ``norm`` ``(d_in,)``
  (``n``), in the notation of the module docstring."""

  h_lam: jax.Array
  k_t: jax.Array
  norm: jax.Array


def _factor(gram: jax.Array, *, percdamp: float, rho: float) -> ADMMFactor:
  norm = jnp.sqrt(jnp.diag(gram)) + 1e-8
  h = gram / norm[:, None] / norm[None, :]
  eye = jnp.eye(h.shape[0], dtype=gram.dtype)
  h_lam = h + percdamp * jnp.mean(jnp.diag(h)) * eye
  lower = jnp.linalg.cholesky(h_lam + rho * eye)
  k = jax.scipy.linalg.cho_solve((lower, True), eye)
  return ADMMFactor(h_lam, k.T, norm)


@functools.partial(jax.jit, static_argnames=("rho", "percdamp"))
def admm_prepare(stats: Stats, *, rho: float = 1.0, percdamp: float = 0.1) -> ADMMFactor:
  """The :class:`ADMMFactor` of ``stats.gram`` that :func:`admm` and :func:`admm_update` compute first (one Cholesky
  factorisation and a ``d_in × d_in`` inverse), for linears that read the same inputs to share:
  ``admm(w, stats, prepared=factor)`` with the same ``rho`` and ``percdamp`` gives what ``admm(w, stats)`` gives."""
  check_gram("admm", stats)
  _check_hparams(rho, percdamp, 0)
  gram = stats.gram
  return _factor(gram.astype(compute_dtype(gram)), percdamp=percdamp, rho=rho)


def _precondition(w, stats, percdamp, rho, prepared):
  """Returns ``(w0, b, k_t, norm)``: scaled weights and ``B`` ``(d_out, d_in)``, ``Kᵀ`` and ``n`` ``(d_in,)``."""
  dtype = compute_dtype(w)
  d_in = w.shape[1]
  if prepared is None:
    prepared = _factor(stats.gram.astype(dtype), percdamp=percdamp, rho=rho)
  elif prepared.k_t.shape != (d_in, d_in):
    raise JaxpruneError(f"admm: a prepared factor of shape {prepared.k_t.shape} does not fit weights {w.shape}")
  h_lam, k_t, norm = (x.astype(dtype) for x in prepared)
  w0 = w.astype(dtype) * norm[None, :]
  b = jnp.matmul(w0, h_lam, precision=HIGHEST)
  return w0, b, k_t, norm


def _iterate(carry, mask, b, k_t, rho):
  """One ADMM iteration on ``(W, U)`` ``(d_out, d_in)`` with the keep ``mask``."""
  w, u = carry
  z = jnp.where(mask, w + u, 0)
  u = u + w - z
  return jnp.matmul(b + rho * (z - u), k_t, precision=HIGHEST), u


def _solve(w, stats, select, mask0, *, rho, percdamp, iterations, mask_iterations, prepared=None):
  """Runs ADMM; ``select(k, scores)`` gives the keep mask of mask iteration ``k``. Returns ``(Ŵ, mask)``."""
  w0, b, k_t, norm = _precondition(w, stats, percdamp, rho, prepared)

  def masked(k, carry):
    w, u, _ = carry
    mask = select(k, jnp.abs(w + u))
    return *_iterate((w, u), mask, b, k_t, rho), mask

  def fixed(_, carry):
    w, u, mask = carry
    return *_iterate((w, u), mask, b, k_t, rho), mask

  mask = select(None, jnp.abs(w0)) if mask0 is None else mask0
  carry = (w0, jnp.zeros_like(w0), mask)
  if mask_iterations:
    carry = jax.lax.fori_loop(0, mask_iterations, masked, carry)
  w, u, mask = jax.lax.fori_loop(mask_iterations, iterations, fixed, carry)
  return jnp.where(mask, w + u, 0) / norm[None, :], mask


def _cubic_remaining(mask_iterations):
  """``(1 − (k+1)/K)³`` for ``k < K``, in float64 on the host (``0`` exactly at ``k = K − 1``)."""
  return [(1.0 - (k + 1) / mask_iterations) ** 3 for k in range(mask_iterations)]


def _gradual_select(pattern, shape, schedule, mask_iterations):
  """The mask rule ``select(k, scores)``; ``k=None`` (or ``schedule="final"``) selects the final pattern."""

  def final(scores):
    return pattern_mask(scores, pattern, default_scope=DEFAULT_SCOPE)

  if schedule == "final" or mask_iterations == 0:
    return lambda k, scores: final(scores)
  remaining = _cubic_remaining(mask_iterations)
  d_out, d_in = shape
  if isinstance(pattern, NM):
    per_row_total = d_in // pattern.m * pattern.pruned
    counts = jnp.asarray([int(per_row_total * (1.0 - c)) for c in remaining], jnp.int32)

    def select_nm(k, scores):
      candidates = ~nm_mask(scores, n=pattern.n, m=pattern.m)
      return keep_mask(jnp.where(candidates, scores, jnp.inf), counts[k])

    return select_nm
  s = pattern.sparsity
  per_row = (pattern.scope or DEFAULT_SCOPE) == "row"
  size = d_in if per_row else d_out * d_in
  counts = jnp.asarray([num_pruned(size, s - s * c) for c in remaining], jnp.int32)
  return lambda k, scores: (keep_mask if per_row else layer_mask)(scores, counts[k])


def _check_hparams(rho, percdamp, iterations, mask_iterations=0, schedule="cubic"):
  if not isinstance(rho, numbers.Real) or not 0 < rho < float("inf"):
    raise JaxpruneError(f"admm: rho must be a positive finite number, got {rho!r}")
  if not isinstance(percdamp, numbers.Real) or not 0 <= percdamp < float("inf"):
    raise JaxpruneError(f"admm: percdamp must be a finite number >= 0, got {percdamp!r}")
  for name, v in (("iterations", iterations), ("mask_iterations", mask_iterations)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise JaxpruneError(f"admm: {name} must be an integer >= 0, got {v!r}")
  if mask_iterations > iterations:
    raise JaxpruneError(f"admm: mask_iterations ({mask_iterations}) cannot exceed iterations ({iterations})")
  if schedule not in SCHEDULES:
    raise JaxpruneError(f"admm: schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


@functools.partial(jax.jit, static_argnames=("rho", "percdamp", "iterations", "with_error"))
def admm_update(w: jax.Array, stats: Stats, *, mask: jax.Array, rho: float = 1.0, percdamp: float = 0.1,
                iterations: int = 20, with_error: bool = True, prepared: ADMMFactor | None = None) -> SolverResult:
  """ADMM weight update of ``w`` ``(d_out, d_in)`` on a fixed keep ``mask`` ``(d_out, d_in)`` (Boža 2024, Alg. 1).

  Args:
    w: weights, any float dtype (computed in float32; float64 under x64).
    stats: calibration statistics with a Gram matrix (any positive scale).
    mask: bool keep mask.
    rho: ADMM penalty ``ρ``, relative to the unit-diagonal normalised Gram.
    percdamp: ridge ``λ = percdamp · mean(diag H)``.
    iterations: ADMM iterations.
    with_error: whether to return the reconstruction error (else ``error`` is ``None``).
    prepared: the :class:`ADMMFactor` of ``stats`` from :func:`admm_prepare` with the same ``rho`` and ``percdamp``
      (default: computed here).
  """
  check_inputs("admm_update", w, stats, Unstructured(0.0), needs="gram")
  _check_hparams(rho, percdamp, iterations)
  if mask.shape != w.shape:
    raise JaxpruneError(f"admm_update: mask shape {mask.shape} differs from weights {w.shape}")
  mask = mask.astype(bool)
  w_new, _ = _solve(w, stats, None, mask, rho=rho, percdamp=percdamp, iterations=iterations, mask_iterations=0,
                    prepared=prepared)
  return finish(w, w_new, mask, stats, with_error=with_error)


@functools.partial(jax.jit, static_argnames=("pattern", "rho", "percdamp", "iterations", "mask_iterations",
                                                  "schedule", "with_error"))
def admm(w: jax.Array, stats: Stats, *, pattern: Unstructured | NM, rho: float = 1.0, percdamp: float = 0.1,
         iterations: int = 20, mask_iterations: int = 15, schedule: str = "cubic",
         with_error: bool = True, prepared: ADMMFactor | None = None) -> SolverResult:
  """Gradual ADMM pruning (ADMM-Grad) of ``w`` ``(d_out, d_in)`` to ``pattern``.

  Args:
    w: weights, any float dtype (computed in float32; float64 under x64).
    stats: calibration statistics with a Gram matrix (any positive scale).
    pattern: ``Unstructured`` (scope ``None`` or ``"row"``: per output row, the reference's ``per_out``;
      ``"layer"``: one ranking over the matrix, the reference's default) or ``NM``.
    rho, percdamp, iterations: as in :func:`admm_update`.
    mask_iterations: the first iterations that re-select the mask (``0``: one mask from ``|W0|``).
    schedule: ``"cubic"`` (the paper) or ``"final"`` (the reference code's unstructured behaviour).
    with_error, prepared: as in :func:`admm_update`.
  """
  check_inputs("admm", w, stats, pattern, needs="gram")
  _check_hparams(rho, percdamp, iterations, mask_iterations, schedule)
  select = _gradual_select(pattern, w.shape, schedule, mask_iterations)
  mask0 = None if mask_iterations == 0 else jnp.ones_like(w, dtype=bool)
  w_new, mask = _solve(w, stats, select, mask0, rho=rho, percdamp=percdamp, iterations=iterations,
                       mask_iterations=mask_iterations, prepared=prepared)
  return finish(w, w_new, mask, stats, with_error=with_error)
