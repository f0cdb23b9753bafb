"""LLM Surgeon math: updates and costs against the full Kronecker product in float64 NumPy, global allocation.

Problems are small (``W`` ``(5, 16)``, so ``F = G ⊗ A`` is ``80 × 80``) with random well-conditioned SPD ``A``
and ``G``. References are independent of the code under test: the constrained minimiser of ``½ δᵀFδ`` subject
to ``(w + δ)_Q = 0`` is solved directly from the KKT system on the kept entries (``F_KK δ_K = −F_KQ δ_Q``,
``F = np.kron(G, A)`` with row-major ``vec``), never through the Kronecker closed forms. Under
``jax.enable_x64`` results must match to 1e-8 of ``max |W|`` (measured: ~1e-15); float32 to 1e-5 of the float64
result (measured: 6e-8) and 1e-4 of the references; jit and eager to 1e-5 (different programs, not bitwise).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.errors import JaxpruneError
from jaxprune.prune import NM, Unstructured, nm_mask
from jaxprune.prune.solvers import _surgeon as sg

D_OUT, D_IN = 5, 16


def spd(n, rng):
  """A random SPD ``(n, n)`` second moment with per-feature scales (condition number ~1e2)."""
  x = rng.normal(size=(3 * n, n)) * rng.lognormal(sigma=0.5, size=n)
  return x.T @ x / (3 * n)


def problem(seed=0, d_out=D_OUT, d_in=D_IN):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(d_out, d_in)), spd(d_in, rng), spd(d_out, rng)


def kkt(w, a, g, removed):
  """``(ΔW, cost)``: argmin ``½ vec(ΔW)ᵀ (G⊗A) vec(ΔW)`` s.t. ``(W + ΔW)[removed] = 0``, solved directly."""
  f = np.kron(g, a)
  q = removed.ravel()
  d = np.zeros(w.size)
  d[q] = -w.ravel()[q]
  d[~q] = np.linalg.solve(f[np.ix_(~q, ~q)], -f[np.ix_(~q, q)] @ d[q])
  return d.reshape(w.shape), 0.5 * d @ f @ d


def obs_chunked(w, a_inv, g_inv, keep, chunk):
  """The reference's chunked update, on the full ``F⁻¹ = G⁻¹ ⊗ A⁻¹``: chunks of removed row-major indices."""
  f_inv, w = np.kron(g_inv, a_inv), w.ravel().copy()
  q = np.flatnonzero(~keep.ravel())
  for s in range(0, q.size, chunk):
    ids = q[s:s + chunk]
    w -= f_inv[:, ids] @ np.linalg.solve(f_inv[np.ix_(ids, ids)], w[ids])
  return np.where(keep, w.reshape(keep.shape), 0.0)


def damped_inv(m, damping):
  return np.linalg.inv(m + damping * np.mean(np.diag(m)) * np.eye(len(m)))


def stable_keep(costs, k):
  keep = np.ones(costs.size, bool)
  keep[np.argsort(costs.ravel(), kind="stable")[:k]] = False
  return keep.reshape(costs.shape)


def surgeon_ref(w, a, g, pattern, chunk, damping_a=0.01, damping_g=0.1):
  a_inv, g_inv = damped_inv(a, damping_a), damped_inv(g, damping_g)
  costs = 0.5 * w ** 2 / np.outer(np.diag(g_inv), np.diag(a_inv))
  if isinstance(pattern, NM):
    groups = costs.reshape(-1, pattern.m)
    keep = np.stack([stable_keep(c, pattern.pruned) for c in groups]).reshape(w.shape)
  elif pattern.scope == "row":
    keep = np.stack([stable_keep(c, int(pattern.sparsity * w.shape[1])) for c in costs])
  else:
    keep = stable_keep(costs, int(pattern.sparsity * w.size))
  w_new = obs_chunked(w, a_inv, g_inv, keep, chunk)
  delta = w_new - w
  return w_new, keep, 0.5 * np.trace(delta.T @ g @ delta @ a)


@functools.cache
def jitted(fn, **static):
  """``fn`` jitted with its static options, shared by the tests (one compilation per input type)."""
  return jax.jit(functools.partial(fn, **static))


def x64(*arrays):
  return [jnp.asarray(x, jnp.float64) for x in arrays]


def f32(*arrays):
  return [jnp.asarray(np.asarray(x, np.float32)) for x in arrays]


def close(got, want, tol):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=tol * np.abs(want).max())


# ---------------------------------------------------------------- updates = constrained minimisers (x64)


def test_damped_inverse_x64():
  _, a, _ = problem()
  with jax.enable_x64(True):
    got = np.asarray(jitted(sg.damped_inverse, damping=0.05)(jnp.asarray(a)))
  close(got, damped_inv(a, 0.05), 1e-10)
  assert (got == got.T).all()


def test_remove_rows_and_columns_are_constrained_minimisers_x64():
  w, a, g = problem(1)
  keep_rows, keep_cols = np.ones(D_OUT, bool), np.ones(D_IN, bool)
  keep_rows[[1, 3]] = False
  keep_cols[[0, 5, 6, 11]] = False
  with jax.enable_x64(True):
    wj, a_inv, g_inv = x64(w, np.linalg.inv(a), np.linalg.inv(g))
    rows = np.asarray(jitted(sg.remove_rows)(wj, g_inv, jnp.asarray(keep_rows)))
    cols = np.asarray(jitted(sg.remove_columns)(wj, a_inv, jnp.asarray(keep_cols)))
  close(rows, w + kkt(w, a, g, ~keep_rows[:, None] & np.ones(D_IN, bool))[0], 1e-8)
  close(cols, w + kkt(w, a, g, np.ones(D_OUT, bool)[:, None] & ~keep_cols)[0], 1e-8)
  assert (rows[~keep_rows] == 0).all() and (cols[:, ~keep_cols] == 0).all()


@pytest.mark.parametrize("seed", [2, 3])
def test_remove_elements_one_chunk_is_the_joint_minimiser_x64(seed):
  """Up to ``chunk`` removed weights, spread over rows and columns: the exact joint OBS update."""
  w, a, g = problem(seed)
  keep = stable_keep(np.random.default_rng(seed).random(w.shape), 7)
  with jax.enable_x64(True):
    got = np.asarray(jitted(sg.remove_elements, chunk=7)(*x64(w, np.linalg.inv(a), np.linalg.inv(g)),
                                                         jnp.asarray(keep)))
  close(got, w + kkt(w, a, g, ~keep)[0], 1e-8)
  assert (got[~keep] == 0).all()


def test_remove_elements_chunks_follow_the_reference_x64(chunk=7):
  """Chunks of the row-major removed weights, each solved jointly on the current weights: the reference's
  result; its cost lies above the joint optimum (always) and, on this problem, below no update at all."""
  w, a, g = problem(3)
  keep = np.random.default_rng(3).random(w.shape) > 0.5
  a_inv, g_inv = np.linalg.inv(a), np.linalg.inv(g)
  with jax.enable_x64(True):
    got = np.asarray(jitted(sg.remove_elements, chunk=chunk)(*x64(w, a_inv, g_inv), jnp.asarray(keep)))
  close(got, obs_chunked(w, a_inv, g_inv, keep, chunk), 1e-8)
  quad = lambda d: 0.5 * np.trace(d.T @ g @ d @ a)  # noqa: E731
  assert kkt(w, a, g, ~keep)[1] < quad(got - w) < quad(np.where(keep, w, 0) - w)


# ---------------------------------------------------------------- costs = increase of the quadratic (x64)


def test_costs_are_single_removal_obs_costs_x64():
  w, a, g = problem(4)
  a_inv, g_inv = np.linalg.inv(a), np.linalg.inv(g)
  with jax.enable_x64(True):
    wj, aj, gj, a_invj, g_invj = x64(w, a, g, a_inv, g_inv)
    elem = np.asarray(sg.element_costs(wj, jnp.diag(a_invj), jnp.diag(g_invj)))
    rows = np.asarray(sg.row_costs(wj, aj, g_invj))
    cols = np.asarray(sg.column_costs(wj, gj, a_invj))
  eye_r, eye_c = np.eye(D_OUT, dtype=bool), np.eye(D_IN, dtype=bool)
  want_rows = [kkt(w, a, g, eye_r[r][:, None] & np.ones(D_IN, bool))[1] for r in range(D_OUT)]
  want_cols = [kkt(w, a, g, np.ones(D_OUT, bool)[:, None] & eye_c[c])[1] for c in range(D_IN)]
  want_elem = [[kkt(w, a, g, np.outer(eye_r[i], eye_c[j]))[1] for j in range(D_IN)] for i in range(D_OUT)]
  np.testing.assert_allclose(rows, want_rows, rtol=1e-8)
  np.testing.assert_allclose(cols, want_cols, rtol=1e-8)
  np.testing.assert_allclose(elem, want_elem, rtol=1e-8)
  f_inv = np.kron(g_inv, a_inv)  # exact OBS: ½ w_q² / [F⁻¹]_qq
  np.testing.assert_allclose(elem.ravel(), 0.5 * w.ravel() ** 2 / np.diag(f_inv), rtol=1e-10)


# ---------------------------------------------------------------- one-shot layer solver


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(4, 8)], ids=str)
def test_surgeon_parity_x64(pattern):
  w, a, g = problem(5)
  with jax.enable_x64(True):
    got = jitted(sg.surgeon, pattern=pattern, chunk=7)(*x64(w, a, g))
    assert got.w.dtype == jnp.float64 and got.error.dtype == jnp.float32
  want_w, want_keep, want_err = surgeon_ref(w, a, g, pattern, 7)
  mask = np.asarray(got.mask)
  np.testing.assert_array_equal(mask, want_keep)
  close(got.w, want_w, 1e-8)
  np.testing.assert_allclose(float(got.error), want_err, rtol=1e-6)
  assert (np.asarray(got.w)[~mask] == 0).all()
  if isinstance(pattern, NM):
    assert (mask.reshape(D_OUT, -1, pattern.m).sum(-1) == pattern.n).all()
  else:
    assert (~mask).sum() == int(pattern.sparsity * D_OUT * D_IN)


def test_surgeon_float32_is_close_to_float64():
  w, a, g = problem(6)
  solve = jitted(sg.surgeon, pattern=NM(4, 8), chunk=7)
  with jax.enable_x64(True):
    exact = solve(*x64(w, a, g))
  got = solve(*f32(w, a, g))
  assert got.w.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(exact.mask))
  close(got.w, np.asarray(exact.w), 1e-5)
  np.testing.assert_allclose(float(got.error), float(exact.error), rtol=1e-5)


def test_remove_elements_compiles_once_for_dynamic_masks_and_jit_equals_eager():
  """Masks with different removed counts (so different numbers of chunks) share one compilation."""
  w, a, g = problem(7)
  a_inv, g_inv = np.linalg.inv(a), np.linalg.inv(g)
  traces = []

  @jax.jit
  def update(w, a_inv, g_inv, keep):
    traces.append(1)
    return sg.remove_elements(w, a_inv, g_inv, keep, chunk=7)

  rng = np.random.default_rng(7)
  for fraction in (0.2, 0.7):
    keep = rng.random(w.shape) > fraction
    got = update(*f32(w, a_inv, g_inv), jnp.asarray(keep))
    close(got, obs_chunked(w, a_inv, g_inv, keep, 7), 1e-4)
  assert len(traces) == 1
  eager = sg.remove_elements(*f32(w, a_inv, g_inv), jnp.asarray(keep), chunk=7)
  close(eager, np.asarray(got, np.float64), 1e-5)


def test_surgeon_dead_input_is_finite():
  w, a, g = problem(8)
  a[3, :] = a[:, 3] = 0.0
  out = jitted(sg.surgeon, pattern=NM(4, 8), chunk=7)(*f32(w, a, g))
  assert np.isfinite(np.asarray(out.w)).all() and np.isfinite(float(out.error))
  assert (~np.asarray(out.mask)).sum() == w.size // 2


# ---------------------------------------------------------------- global allocation


SHAPES = [(6, 8), (4, 16), (3, 24)]


@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.9])
def test_global_elements_exact_count_threshold_and_ties(sparsity):
  rng = np.random.default_rng(9)
  costs = [rng.integers(0, 6, size=s).astype(np.float64) for s in SHAPES]  # many ties
  out = sg.global_threshold(costs, sparsity=sparsity)
  flat_cost = np.concatenate([c.ravel() for c in costs])
  pruned = np.concatenate([~m.ravel() for m in out.masks])
  assert pruned.sum() == int(sparsity * flat_cost.size) == sum(out.pruned)
  assert out.sparsities == tuple((~m).sum() / m.size for m in out.masks)
  if pruned.any():
    assert flat_cost[pruned].max() == out.threshold <= flat_cost[~pruned].min()
    tied = pruned[flat_cost == out.threshold]  # earlier layer, lower flat index first
    assert (tied == (np.arange(tied.size) < tied.sum())).all()


@pytest.mark.parametrize("nm", [NM(2, 4), NM(1, 4), NM(4, 8)], ids=str)
def test_global_nm_groups(nm):
  rng = np.random.default_rng(10)
  costs = [rng.random(s) for s in SHAPES]
  total = sum(c.size for c in costs)
  for sparsity in (0.3 * nm.sparsity, nm.sparsity):
    out = sg.global_threshold(costs, sparsity=sparsity, structure=nm)
    assert sum(out.pruned) == int(sparsity * total) // nm.pruned * nm.pruned
    hit, missed = [], []
    for c, m in zip(costs, out.masks):
      groups, keep = c.reshape(-1, nm.m), m.reshape(-1, nm.m)
      kept = keep.sum(-1)
      assert set(kept) <= {nm.n, nm.m}
      for cg, kg in zip(groups, keep):
        (hit if kg.sum() == nm.n else missed).append(np.sort(cg)[:nm.pruned].sum())
        if kg.sum() == nm.n:
          np.testing.assert_array_equal(kg, stable_keep(cg, nm.pruned))
    assert max(hit) == out.threshold and (not missed or max(hit) <= min(missed))
  groups = np.concatenate([c.reshape(-1, nm.m) for c in costs])  # at full N:M sparsity: the local N:M mask
  local = np.asarray(jitted(nm_mask, n=nm.n, m=nm.m)(jnp.asarray(groups)))
  np.testing.assert_array_equal(np.concatenate([m.reshape(-1, nm.m) for m in out.masks]), local)


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_global_rows_columns_parameter_accounting(sparsity):
  rng = np.random.default_rng(11)
  shapes = SHAPES + [(10, 5)]
  costs = [(rng.random(r), rng.random(c)) for r, c in shapes]
  out = sg.global_threshold(costs, sparsity=sparsity, structure="rows_columns")
  budget = int(sparsity * sum(r * c for r, c in shapes))
  gaps = []
  for (rc, cc), (rows, cols), m, kr, kc, p in zip(costs, shapes, out.masks, out.keep_rows, out.keep_cols,
                                                  out.pruned):
    np.testing.assert_array_equal(m, np.outer(kr, kc))
    r, c = (~kr).sum(), (~kc).sum()
    assert p == (~m).sum() == r * cols + c * rows - r * c
    assert np.concatenate([rc[~kr], cc[~kc]]).max(initial=-np.inf) <= out.threshold
    assert out.threshold <= np.concatenate([rc[kr], cc[kc]]).min()
    gaps += [(rc[kr].min(initial=np.inf), cols - c), (cc[kc].min(initial=np.inf), rows - r)]  # next ones' gains
  assert 0 < sum(out.pruned) <= budget < sum(out.pruned) + min(gaps)[1]  # short by less than the next row/column


# ---------------------------------------------------------------- bad input: one-line JaxpruneError


@pytest.mark.parametrize("call, match", [
    (lambda w, a, g: sg.surgeon(w[:, :14], a[:14, :14], g, pattern=NM(2, 4)), "divisible by 4, got 14"),
    (lambda w, a, g: sg.surgeon(w, a[:8, :8], g, pattern=NM(2, 4)), "A must be"),
    (lambda w, a, g: sg.surgeon(w, a, g, pattern=Unstructured(0.5), damping_a=-1.0), "damping_a"),
    (lambda w, a, g: sg.remove_elements(w, a, g, w > 0, chunk=0), "chunk"),
    (lambda w, a, g: sg.remove_rows(w, g, jnp.ones(D_OUT, jnp.int32)), "mask must be bool"),
    (lambda w, a, g: sg.global_threshold([w], sparsity=1.0), r"\[0, 1\)"),
    (lambda w, a, g: sg.global_threshold([w], sparsity=-0.1), r"\[0, 1\)"),
    (lambda w, a, g: sg.global_threshold([w[:, :6]], sparsity=0.5, structure=NM(2, 4)), "divisible by 4"),
    (lambda w, a, g: sg.global_threshold([w], sparsity=0.5, structure=NM(3, 4)), "at most 0.25"),
    (lambda w, a, g: sg.global_threshold([w], sparsity=0.5, structure="rows_columns"), "pair per layer"),
    (lambda w, a, g: sg.global_threshold([w], sparsity=0.5, structure="blocks"), "structure must be"),
])
def test_bad_input_raises_one_line(call, match):
  w, a, g = f32(*problem(12))
  with pytest.raises(JaxpruneError, match=match) as err:
    call(w, a, g)
  assert "\n" not in str(err.value)
