"""Calibration statistics: exact sums, streaming, data-parallel psum, conventions, damping and dead inputs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxprune.errors import JaxpruneError
from jaxprune.prune import accumulate, accumulate_sharded, init_stats
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


def assert_close_to(stats, x, rtol):
  gram, sq, count = f64_sums(x)
  if stats.gram is not None:
    np.testing.assert_allclose(np.asarray(stats.gram), gram, rtol=rtol, atol=rtol * np.abs(gram).max())
  np.testing.assert_allclose(np.asarray(stats.sq_norms), sq, rtol=rtol)
  assert float(stats.count) == count


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
  assert_close_to(stats, x, 1e-5)
  one_shot = accumulate(init_stats(24), jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(one_shot.gram), np.asarray(stats.gram), rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(stats.gram).max()))
  assert step._cache_size() == 1


@pytest.mark.parametrize("d", [300, 601], ids=["2-blocks", "4-uneven-blocks"])
def test_wide_gram_from_upper_blocks_is_exact_and_symmetric(d):
  """Wide inputs take the Gram from its upper block triangle: float64-close, exactly symmetric, and equal to
  one full product entry by entry, also data-parallel over an explicit mesh axis."""
  x = activations((3, 70, d), seed=5)
  stats = jax.jit(accumulate)(init_stats(d), jnp.asarray(x))
  assert_close_to(stats, x, 1e-5)
  gram = np.asarray(stats.gram)
  np.testing.assert_array_equal(gram, gram.T)
  flat = jnp.asarray(x.reshape(-1, d))
  full = jnp.matmul(flat.T, flat, precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(gram, np.asarray(full), rtol=1e-6, atol=1e-6 * float(jnp.abs(full).max()))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  sharded = jax.jit(lambda s, x: accumulate_sharded(s, x, mesh=mesh))(init_stats(d), jnp.asarray(x))
  assert_close_to(sharded, x, 1e-5)
  np.testing.assert_array_equal(np.asarray(sharded.gram), np.asarray(sharded.gram).T)


def test_accumulate_bfloat16_in_float32_and_diag_only():
  x = activations((40, 12), seed=1)
  stats = accumulate(init_stats(12), jnp.asarray(x, jnp.bfloat16))
  assert stats.gram.dtype == jnp.float32 and stats.sq_norms.dtype == jnp.float32
  assert_close_to(stats, np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), 1e-5)
  diag = jax.jit(accumulate)(init_stats(12, gram=False), jnp.asarray(x))
  assert diag.gram is None
  np.testing.assert_allclose(np.asarray(diag.sq_norms), np.diag(np.asarray(accumulate(init_stats(12), x).gram)),
                             rtol=1e-6)


def test_dead_inputs_are_exact_zeros():
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
  """8 devices on ``data``; 2·37 tokens are not a multiple of 8 (zero rows pad the last shard)."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  x = jnp.asarray(activations((2, 37, 20), seed=2))
  start = accumulate(init_stats(20, gram=gram), jnp.asarray(activations((9, 20), seed=3)))
  got = jax.jit(lambda s, x: accumulate_sharded(s, x, mesh=mesh))(start, x)
  want = accumulate(start, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6 * float(jnp.abs(b).max()))
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
  assert_close_to(plain, x, 1e-5)
  assert_close_to(sharded, x, 1e-5)


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
  stats = accumulate(init_stats(8), jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(2 * np.asarray(stats.gram) / 6, h, rtol=1e-5, atol=1e-5 * np.abs(h).max())
  np.testing.assert_allclose(np.asarray(stats.sq_norms) / 6, scaler, rtol=1e-5)


# ---------------------------------------------------------------- damping (SparseGPT's inverse factor)


def gram_of(x):
  return jnp.asarray(f64_sums(x)[0], jnp.float32)


def test_inverse_cholesky_upper_matches_float64():
  h = gram_of(activations((80, 16), seed=5))
  u = np.asarray(inverse_cholesky_upper(h, percdamp=0.01), np.float64)
  h64 = np.asarray(h, np.float64)
  want = np.linalg.inv(h64 + 0.01 * np.mean(np.diag(h64)) * np.eye(16))
  np.testing.assert_allclose(u.T @ u, want, rtol=0, atol=1e-4 * np.abs(want).max())
  assert np.all(np.tril(u, -1) == 0) and np.all(np.diag(u) > 0)


def test_damping_retries_until_positive_definite():
  """Indefinite ``H`` (eigenvalue ``-0.5·mean diag``): 0.01 and 0.1 fail, the third damping (1.0) succeeds."""
  q, _ = np.linalg.qr(np.random.default_rng(6).normal(size=(12, 12)))
  eig = np.linspace(1.0, 2.0, 12)
  eig[0] = -eig[1:].sum() / 25  # = -0.5 · mean(eig) = -0.5 · mean(diag H)
  h64 = (q * eig) @ q.T
  h = jnp.asarray(h64, jnp.float32)
  u = np.asarray(jax.jit(lambda h: inverse_cholesky_upper(h, percdamp=0.01))(h), np.float64)
  mean = np.mean(np.diag(h64))
  assert np.linalg.eigvalsh(h64 + 0.1 * mean * np.eye(12))[0] < 0 < np.linalg.eigvalsh(h64 + mean * np.eye(12))[0]
  want = np.linalg.inv(h64 + 1.0 * mean * np.eye(12))
  np.testing.assert_allclose(u.T @ u, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_damping_falls_back_to_diagonal_when_retries_run_out():
  h = jnp.asarray(np.diag([4.0, 1.0, 9.0]) - 3.0 * np.ones((3, 3)) + 3.0 * np.eye(3), jnp.float32)
  u = np.asarray(inverse_cholesky_upper(h, percdamp=0.0, max_retries=0))
  assert np.isfinite(u).all()
  np.testing.assert_allclose(u, np.diag(1 / np.sqrt(np.diag(np.asarray(h)))), rtol=1e-6)
