"""Calibration statistics: exact sums, streaming, data-parallel psum, conventions, damping and dead inputs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances as tol
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxprune.errors import JaxpruneError
from jaxprune.prune import accumulate, accumulate_sharded, init_stats
from jaxprune.prune._stats import _GRAM_MIN_BLOCK, _GRAM_PARTS
from jaxprune.prune.solvers._sparsegpt import inverse_cholesky_upper


def activations(shape, seed=0, dead=()):
  """Correlated activations ``shape = (..., d)`` with per-feature scales; ``dead`` features are exactly 0."""
  rng = np.random.default_rng(seed)
  d = shape[-1]
  x = rng.normal(size=shape) @ (np.eye(d) + rng.normal(size=(d, d)) / np.sqrt(d)) * rng.lognormal(size=d)
  x[..., list(dead)] = 0.0
  return x.astype(np.float32)


def f64_sums(x):
  x = x.reshape(-1, x.shape[-1]).astype(np.float64)
  return x.T @ x, (x * x).sum(0), x.shape[0]


def assert_close_to(stats, x):
  """``stats`` hold the sums of ``x`` ``(..., d)``: each entry within the float32 bound of any summation order."""
  gram, sq, count = f64_sums(x)
  bound = tol.f32_sum_bound(count)
  if stats.gram is not None:
    ax = np.abs(x.reshape(-1, x.shape[-1]).astype(np.float64))
    tol.assert_within(stats.gram, gram, bound * (ax.T @ ax), "gram")
  tol.assert_within(stats.sq_norms, sq, bound * sq, "sq_norms")
  assert float(stats.count) == count  # a token count: exact in float32 below 2^24


def test_init_stats():
  stats = init_stats(6)
  assert stats.gram.shape == (6, 6) and stats.sq_norms.shape == (6,) and stats.count.shape == ()
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(stats))
  assert init_stats(6, gram=False).gram is None and len(jax.tree.leaves(init_stats(6, gram=False))) == 2


def test_accumulate_streams_batches_with_any_leading_dims():
  x = activations((3, 5, 16, 24))  # 3 batches of (5 sequences, 16 tokens)
  step = jax.jit(accumulate)
  stats = init_stats(24)
  for batch in x:
    stats = step(stats, jnp.asarray(batch))
  assert_close_to(stats, x)
  assert_close_to(accumulate(init_stats(24), jnp.asarray(x)), x)  # one shot: the same sums in another order
  assert step._cache_size() == 1


def assert_mirrored(gram, parts):
  """The blocks below the diagonal of ``gram`` ``(d, d)`` (``parts`` column blocks) are the transposed blocks
  above it, bit for bit (one product serves both)."""
  d = gram.shape[0]
  edges = [d * i // parts for i in range(parts + 1)]
  for i in range(parts):
    for j in range(i):
      rows, cols = slice(edges[i], edges[i + 1]), slice(edges[j], edges[j + 1])
      np.testing.assert_array_equal(gram[rows, cols], gram[cols, rows].T)


@pytest.mark.parametrize("d", [300, 601], ids=["2-blocks", "4-uneven-blocks"])
def test_wide_gram_from_upper_blocks_is_exact_and_symmetric(d):
  """Wide inputs take the Gram from its upper block triangle: within float32 rounding of the float64 sums, the
  blocks below the diagonal mirrored from those above, also data-parallel over an explicit mesh axis."""
  parts = min(_GRAM_PARTS, d // _GRAM_MIN_BLOCK)
  assert parts == (2 if d == 300 else 4)  # the cases exercise what their names say
  x = activations((3, 70, d), seed=5)
  stats = jax.jit(accumulate)(init_stats(d), jnp.asarray(x))
  assert_close_to(stats, x)
  assert_mirrored(np.asarray(stats.gram), parts)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  sharded = jax.jit(lambda s, x: accumulate_sharded(s, x, mesh=mesh))(init_stats(d), jnp.asarray(x))
  assert_close_to(sharded, x)
  assert_mirrored(np.asarray(sharded.gram), parts)


def test_accumulate_bfloat16_in_float32_and_diag_only():
  x = activations((40, 12), seed=1)
  stats = accumulate(init_stats(12), jnp.asarray(x, jnp.bfloat16))
  assert stats.gram.dtype == jnp.float32 and stats.sq_norms.dtype == jnp.float32
  assert_close_to(stats, np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)))
  diag = jax.jit(accumulate)(init_stats(12, gram=False), jnp.asarray(x))
  assert diag.gram is None
  assert_close_to(diag, x)


def test_dead_inputs_are_exact_zeros():
  """Products with an exact zero and sums of exact zeros are exact in any order: bitwise on any machine."""
  stats = accumulate(init_stats(10), jnp.asarray(activations((50, 10), dead=(2, 7))))
  assert (np.asarray(stats.sq_norms)[[2, 7]] == 0).all()
  assert (np.asarray(stats.gram)[[2, 7]] == 0).all() and (np.asarray(stats.gram)[:, [2, 7]] == 0).all()


def test_bad_inputs_raise():
  with pytest.raises(JaxpruneError, match="input width 8"):
    accumulate(init_stats(8), jnp.ones((4, 9)))
  with pytest.raises(JaxpruneError, match="no axis 'batch'; its axes are data"):
    accumulate_sharded(init_stats(8), jnp.ones((4, 8)), mesh=jax.make_mesh((8,), ("data",)), axis="batch")


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize("gram", [True, False], ids=["gram", "diag"])
def test_sharded_psum_equals_unsharded(axis_type, gram):
  """8 devices on ``data``; 2·37 tokens are not a multiple of 8 (zero rows pad the last shard). Added to
  statistics of 9 earlier tokens, the sums are those of all 83 tokens, as the unsharded function's are."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  x, earlier = activations((2, 37, 20), seed=2), activations((9, 20), seed=3)
  start = accumulate(init_stats(20, gram=gram), jnp.asarray(earlier))
  everything = np.concatenate([earlier, x.reshape(-1, 20)])
  got = jax.jit(lambda s, x: accumulate_sharded(s, x, mesh=mesh))(start, jnp.asarray(x))
  assert_close_to(got, everything)
  assert_close_to(accumulate(start, jnp.asarray(x)), everything)
  assert float(got.count) == 9 + 74 and (got.gram is None) == (not gram)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_inputs_already_sharded_over_batch(axis_type):
  """Activations that arrive with their batch on ``data``: both functions give the unsharded sums."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  x = activations((8, 5, 12), seed=7)
  xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    plain = jax.jit(accumulate)(init_stats(12), xs)
    sharded = jax.jit(lambda s, x: accumulate_sharded(s, x, mesh=mesh))(init_stats(12), xs)
  assert_close_to(plain, x)
  assert_close_to(sharded, x)


def test_normalisation_conventions_are_rescalings():
  """SparseGPT's running ``H = (2/N) Σ x xᵀ`` and Wanda's mean over sequences are the raw sums rescaled."""
  x = activations((6, 10, 8), seed=4).astype(np.float64)  # 6 sequences of 10 tokens
  h, nsamples, scaler, wanda_n = np.zeros((8, 8)), 0, np.zeros(8), 0
  for seq in x:  # the reference add_batch loops, one sequence per batch
    h *= nsamples / (nsamples + 1)
    nsamples += 1
    inp = np.sqrt(2 / nsamples) * seq.T
    h += inp @ inp.T
    scaler *= wanda_n / (wanda_n + 1)
    wanda_n += 1
    scaler += (seq ** 2).sum(0) / wanda_n
  x32 = x.astype(np.float32)
  stats = accumulate(init_stats(8), jnp.asarray(x32))
  np.testing.assert_allclose(h * 6 / 2, f64_sums(x32)[0], rtol=tol.F64_REFERENCE,
                             atol=tol.F64_REFERENCE * np.abs(h).max())
  np.testing.assert_allclose(scaler * 6, f64_sums(x32)[1], rtol=tol.F64_REFERENCE)
  assert_close_to(stats, x32)


# ---------------------------------------------------------------- damping (SparseGPT's inverse factor)


def gram_of(x):
  return jnp.asarray(f64_sums(x)[0], jnp.float32)


def assert_inverse_factor(u, damped):
  """``uᵀu`` of the float32 factor ``u`` ``(d, d)`` is the float64 inverse of ``damped`` ``(d, d)``."""
  assert np.linalg.cond(damped) < tol.INVERSE_MAX_COND  # what keeps INVERSE_F32 a bound
  want = np.linalg.inv(damped)
  u = np.asarray(u, np.float64)
  np.testing.assert_allclose(u.T @ u, want, rtol=0, atol=tol.INVERSE_F32 * np.abs(want).max())


def test_inverse_cholesky_upper_matches_float64():
  h = gram_of(activations((80, 16), seed=5))
  u = np.asarray(inverse_cholesky_upper(h, percdamp=0.01), np.float64)
  h64 = np.asarray(h, np.float64)
  assert_inverse_factor(u, h64 + 0.01 * np.mean(np.diag(h64)) * np.eye(16))
  assert np.all(np.tril(u, -1) == 0) and np.all(np.diag(u) > 0)


def test_inverse_cholesky_upper_by_halves_matches_float64():
  """Above 256 inputs the triangular inverse is taken by halves (two levels at 600 = 384 + 216, then 256 + 128):
  the factor is still that of the float64 inverse."""
  h = gram_of(activations((1200, 600), seed=8))
  u = np.asarray(jax.jit(lambda h: inverse_cholesky_upper(h, percdamp=0.1))(h), np.float64)
  h64 = np.asarray(h, np.float64)
  assert_inverse_factor(u, h64 + 0.1 * np.mean(np.diag(h64)) * np.eye(600))  # damped to the bound's condition
  assert np.all(np.tril(u, -1) == 0) and np.all(np.diag(u) > 0)


def test_inverse_cholesky_upper_pads_with_identity_and_takes_dead_inputs_as_one():
  """``pad`` appends rows and columns of the identity exactly; a zero diagonal entry (a dead input) counts as 1,
  also in the mean that scales the damping."""
  h = gram_of(activations((80, 12), seed=7, dead=(4,)))
  u = np.asarray(inverse_cholesky_upper(h, percdamp=0.01, pad=5), np.float64)
  assert u.shape == (17, 17)
  np.testing.assert_array_equal(u[12:, 12:], np.eye(5))
  assert np.all(u[:12, 12:] == 0) and np.all(u[12:, :12] == 0)
  h64 = np.asarray(h, np.float64)
  h64[4, 4] = 1.0
  assert_inverse_factor(u[:12, :12], h64 + 0.01 * np.mean(np.diag(h64)) * np.eye(12))


def test_damping_retries_until_positive_definite():
  """Indefinite ``H`` (eigenvalue ``-0.5·mean diag``): 0.01 and 0.1 fail, the third damping (1.0) succeeds."""
  q, _ = np.linalg.qr(np.random.default_rng(6).normal(size=(12, 12)))
  eig = np.linspace(1.0, 2.0, 12)
  eig[0] = -eig[1:].sum() / 25  # = -0.5 · mean(eig) = -0.5 · mean(diag H)
  h64 = (q * eig) @ q.T
  h = jnp.asarray(h64, jnp.float32)
  u = jax.jit(lambda h: inverse_cholesky_upper(h, percdamp=0.01))(h)
  mean = np.mean(np.diag(h64))
  assert np.linalg.eigvalsh(h64 + 0.1 * mean * np.eye(12))[0] < 0 < np.linalg.eigvalsh(h64 + mean * np.eye(12))[0]
  assert_inverse_factor(u, h64 + 1.0 * mean * np.eye(12))


def test_damping_falls_back_to_diagonal_when_retries_run_out():
  h = jnp.asarray(np.diag([4.0, 1.0, 9.0]) - 3.0 * np.ones((3, 3)) + 3.0 * np.eye(3), jnp.float32)
  u = np.asarray(inverse_cholesky_upper(h, percdamp=0.0, max_retries=0))
  assert np.isfinite(u).all()
  np.testing.assert_allclose(u, np.diag(1 / np.sqrt(np.diag(np.asarray(h, np.float64)))), rtol=tol.ELEMENTWISE_F32)


@pytest.mark.parametrize("columns", [7, 20, 64])
def test_reconstruction_error_by_column_blocks_matches_float64(monkeypatch, columns):
  """``tr(ΔW G ΔWᵀ)`` summed over blocks of ``G``'s columns (the last block moved back to overlap the one
  before, the shared columns counted once) against float64: blocks of 7 over 20 columns overlap, 20 fit
  exactly, 64 exceed the width. Every term is a product of float32 values: a sum bound holds."""
  from jaxprune.prune.solvers import _base

  monkeypatch.setattr(_base, "_ERROR_COLUMNS", columns)
  rng = np.random.default_rng(11)
  w = rng.normal(size=(6, 20)).astype(np.float32)
  w_hat = np.where(rng.random((6, 20)) < 0.5, 0, w).astype(np.float32)
  g = f64_sums(activations((50, 20), seed=12))[0].astype(np.float32)
  stats = init_stats(20)._replace(gram=jnp.asarray(g))
  got = float(_base.reconstruction_error(jnp.asarray(w), jnp.asarray(w_hat), stats))
  delta = w.astype(np.float64) - w_hat
  g64 = g.astype(np.float64)
  want = np.sum(delta * (delta @ g64))
  bound = tol.f32_sum_bound(20 * 20 + 20) * np.sum(np.abs(delta) * (np.abs(delta) @ np.abs(g64)))
  assert abs(got - want) <= bound + tol.F32_UNIT * abs(want)
