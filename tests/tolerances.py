"""Every numerical tolerance of the test suite, in one place, with the reason it holds on any machine.

Rules the tests follow:

- A float32 result is compared with a float64 NumPy reference, never with another float32 computation: two
  different XLA computations (jit and eager, sharded and unsharded, blocked and full products) may sum in
  another order, and another CPU rounds them differently (a test that asserted a blocked Gram equal to the full
  product to 1e-6 failed on a 2-core AMD EPYC with 5.4e-4 relative differences in its smallest entries).
- Bitwise equality only for (a) the same computation run twice (determinism, resume) and (b) results that are
  exact in any order: copies and ``where``, sums of exact zeros, selections among scores that are small integers,
  counts below 2^24.
- A keep mask of a float32 solver is asserted equal to the float64 reference's only where every selection the
  reference made has a margin of at least :data:`MASK_MARGIN` (the tests check it, so a seed that lands on a
  near-tie fails loudly instead of flipping on another machine).

Measured values below are the largest seen on this suite's seeded problems (float32 solvers: 60 seeds × 2 (with
and without dead inputs) × 4 solvers × 6 patterns, against the float64 references of ``reference_np``).
"""
from __future__ import annotations

import numpy as np

F32_UNIT = 2.0 ** -24  # unit roundoff of float32: |fl(a ∘ b) − a ∘ b| ≤ u |a ∘ b|
F64_UNIT = 2.0 ** -53


def f32_sum_bound(terms: int) -> float:
  """γ_n = n·u / (1 − n·u) for float32: a sum of ``terms`` float32 products, evaluated in ANY order (blocked,
  pairwise, split over devices and reduced, with or without fused multiply-add), is within ``γ_n · Σ|products|``
  of the exact sum (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 3.5). Used for the
  statistics ``Σ x xᵀ`` and ``Σ x²``: a bound, not a measurement, so it holds on every machine."""
  nu = terms * F32_UNIT
  return nu / (1 - nu)


# Two float64 formulas for the same quantity (a running mean against a plain sum), relative: float64 rounding
# over at most a few hundred terms, n·2^-53 ≈ 1e-14.
F64_REFERENCE = 1e-12

# Elementwise float32 functions (sqrt, reciprocal, division) against float64: XLA's are accurate to a few ulp but
# not always correctly rounded (fast reciprocal square roots refined by a Newton step); 1e-6 ≈ 17 ulp.
ELEMENTWISE_F32 = 1e-6

# A float32 inverse (Cholesky factor, triangular inverse) against float64 ``np.linalg.inv``, relative to the
# largest entry: the first-order forward error bound is κ·u, 6e-5 at κ = 1000; tests assert κ below
# INVERSE_MAX_COND so that this stays the bound (measured: 1.2e-7 at κ = 800).
INVERSE_F32 = 1e-4
INVERSE_MAX_COND = 1e3

# Float32 solvers against the float64 references, relative to max |Ŵ| (same mask): ADMM's 20 iterations measured
# up to 6.1e-6, SparseGPT's OBS column loop up to 8.6e-7, magnitude and Wanda copy weights (0).
SOLVER_F32 = 2e-5

# The same solvers under ``jax.enable_x64`` against the float64 references: float64 rounding through at most
# κ ≈ 1e3 amplification is ~1e-13 (measured below 1e-14).
SOLVER_F64 = 1e-10

# ``SolverResult.error`` (float32 ``tr(ΔW G ΔWᵀ)`` from float32 statistics) against the same trace in float64
# from the activations, relative (measured up to 1.1e-6 for float32 and bfloat16 weights).
ERROR_RTOL = 1e-5

# Smallest gap, relative to the largest score, between the highest pruned and the lowest kept score of any
# selection of the float64 reference for which a float32 solver's mask must be identical. Float32 rounding moves
# a score by about one ulp of the largest score (6e-8); no mask differed in the measured problems, down to gaps
# of 6e-8. For float64 solvers the same argument gives F64 scale.
MASK_MARGIN = 1e-6
MASK_MARGIN_F64 = 1e-12

# Perplexity of the embedded SmolLM2-135M (30 blocks, float32) by jaxprune against transformers on the same
# windows, relative: two float32 implementations with their own kernels, summation orders and log-sum-exp.
# Measured 1.3e-4 with transformers 5.x, on 4 × 256 and on 8 × 512 tokens alike (systematic, not noise: the
# PyTorch pass of experiments/parity, which computes rotary embeddings as the reference scripts did, agrees
# to 7.5e-6); 1e-3 leaves a factor 8 and still catches any real error in the model (a wrong norm, RoPE or
# attention mask moves the perplexity by percent).
PERPLEXITY_VS_TORCH = 1e-3


# Logits of a model computing in bfloat16 or float16 against the same weights (rounded to that dtype) computing
# in float32, relative to max |logit|, in units of the narrow dtype's unit roundoff u (bfloat16 2^-8, float16
# 2^-11): every linear and attention output is rounded to the narrow dtype (norms, softmax, logits and every
# product's accumulation are float32), so each of the test model's four blocks adds a few roundings of u to the
# residual stream. Measured over five parameter seeds of the tests' models: LLaMA 7.5 u (bfloat16) and 5.6 u
# (float16), OPT 2.5 u and 2.7 u; 16 u leaves a factor 2.
NARROW_LOGITS_UNITS = 16.0


def unit_roundoff(dtype) -> float:
  """The unit roundoff ``u = eps / 2`` of a float dtype: float32 2^-24, bfloat16 2^-8, float16 2^-11."""
  return float(np.finfo(dtype).eps) / 2


def assert_within(got, want, bound, what: str = "result") -> None:
  """Elementwise ``|got − want| ≤ bound`` (arrays broadcast; ``bound`` may be an array of per-entry bounds)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  excess = np.abs(got - want) - np.broadcast_to(np.asarray(bound, np.float64), want.shape)
  if np.any(excess > 0):
    i = np.unravel_index(np.argmax(excess), excess.shape)
    raise AssertionError(f"{what}: |got − want| exceeds its bound at {i}: got {got[i]!r}, want {want[i]!r}, "
                         f"{int((excess > 0).sum())} of {excess.size} entries")


# Two float32 evaluations of the same function of a test model that differ only in how the work is split (window
# by window or batched, one device or eight, remat or not, parameters sharded or replicated), relative to the
# largest entry of the result: each is within γ_n·Σ|terms| of the exact value (sums of at most a few hundred
# products per layer, a few blocks deep), so they differ by a few float32 ulp of the largest entry, amplified by
# the blocks' conditioning. Measured below 2e-6 on this suite's models (losses, logits, hidden states and every
# gradient leaf); 1e-5 leaves a factor 5 and still catches any real defect (a window counted twice, a shard left
# out, a gradient through the wrong subset moves results by percent).
REORDERED_F32 = 1e-5


def assert_reordered(got, want, what: str = "result") -> None:
  """``got`` within :data:`REORDERED_F32` of ``want``, relative to ``max |want|``: two float32 computations of
  the same quantity in another summation order."""
  want = np.asarray(want, np.float64)
  assert_within(got, want, REORDERED_F32 * max(float(np.abs(want).max(initial=0.0)), np.finfo(np.float32).tiny),
                what)


# Keep masks chosen by two float32 computations of the same scores in another summation order (statistics
# sharded over devices or not, padded batches): a score within float32 rounding (about 1e-7 relative) of the
# threshold may fall on either side, so a rare entry may differ. At most this fraction of a mask may; a real
# defect (statistics of the wrong windows, a shard counted twice or left out) changes a quarter or more of it.
# Measured: no entry differed on this suite's seeds.
MASK_FLIPS = 0.005


def assert_masks_agree(a, b, what: str = "mask") -> np.ndarray:
  """Two keep masks of the same shape differ in at most :data:`MASK_FLIPS` of their entries; returns the
  columns (last axis: the output units of a ``(d_in, d_out)`` kernel) in which they agree entirely, where the
  weights that depend on them may then be compared."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  assert a.shape == b.shape, f"{what}: shapes {a.shape} and {b.shape}"
  differ = a != b
  if differ.mean() > MASK_FLIPS:
    raise AssertionError(f"{what}: {int(differ.sum())} of {differ.size} entries differ (at most "
                         f"{MASK_FLIPS:.1%} may, at near-ties)")
  return ~differ.reshape(-1, differ.shape[-1]).any(0)


# Weights pruned by two float32 passes over the same model and windows that differ only in summation order
# (sharded or not, padded batches, group by group through full forwards), relative to the largest weight: each
# solver result is within SOLVER_F32 of the float64 solution of its own statistics, and the two passes'
# statistics differ by float32 rounding only.
PASS_REORDERED = 2 * SOLVER_F32


def assert_passes_agree(masks_a, layers_a, masks_b, layers_b, kernel_at) -> None:
  """Two pruning passes (per block ``{path: keep mask}`` and the pruned blocks' parameters) chose the same masks
  up to :data:`MASK_FLIPS` and the same kept weights within :data:`PASS_REORDERED` in every output unit whose
  mask agrees; ``kernel_at(block, path)`` reads a kernel."""
  assert len(masks_a) == len(masks_b) == len(layers_a) == len(layers_b)
  for i, (ma, mb) in enumerate(zip(masks_a, masks_b)):
    assert set(ma) == set(mb), f"block {i}: {sorted(ma)} against {sorted(mb)}"
    for name in ma:
      cols = assert_masks_agree(ma[name], mb[name], f"block {i} {name}")
      ka = np.asarray(kernel_at(layers_a[i], name), np.float64)
      kb = np.asarray(kernel_at(layers_b[i], name), np.float64)
      assert_within(ka[..., cols], kb[..., cols], PASS_REORDERED * np.abs(kb).max(), f"block {i} {name}")


# A float32 loss (mean cross-entropy of a test model's windows, its forward in float32) against the same loss in
# float64 from the model's float32 logits or from PyTorch, relative: the log-sum-exp over ≤ 101 logits and the mean
# over ≤ 40 tokens add a few ulp; the forward's own float32 error moves the logits by ~1e-6 relative. Measured
# below 2e-6.
LOSS_F32 = 1e-5
