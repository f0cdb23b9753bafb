"""Solvers: parity with the float64 references, one contract suite over every solver, sharding, input errors.

Problems are random least-squares layers: correlated inputs with per-feature scales (as LLM activations have),
``tokens = 4 · d_in``; widths that are not multiples of the SparseGPT block (``d_in = 40``, block 16).

Every result is compared with the float64 reference (``reference_np``), with the tolerances of ``tolerances``:
float32 solvers within ``SOLVER_F32`` of ``max |Ŵ|``, under ``jax.enable_x64`` within ``SOLVER_F64``; masks
identical where every selection of the reference has a margin of ``MASK_MARGIN`` (checked). Two float32 runs
(jit and eager, sharded and not, scaled statistics) are each compared with the reference, not with each other.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import reference_np as ref
import tolerances as tol
from jaxprune.errors import JaxpruneError
from jaxprune.prune import (
    NM, SOLVERS, Stats, Unstructured, accumulate, admm, admm_update, get_solver, init_stats, sparsegpt)
from jaxprune.prune.solvers import admm_prepare, check_options, solver_options, sparsegpt_prepare

D_OUT, D_IN, BLOCK = 24, 40, 16
DEAD = (3, 17)
PATTERNS = [Unstructured(0.5), Unstructured(0.8), NM(2, 4), NM(1, 4), NM(4, 8)]
HPARAMS = {"sparsegpt": {"blocksize": BLOCK}}
UPDATING = ("sparsegpt", "admm")


def make_problem(d_out=D_OUT, d_in=D_IN, *, dead=(), seed=0):
  """``w`` ``(d_out, d_in)`` and correlated inputs ``x`` ``(4·d_in, d_in)``, float32, ``x[:, dead] = 0``."""
  rng = np.random.default_rng(seed)
  mix = np.eye(d_in) + rng.normal(size=(d_in, d_in)) / np.sqrt(d_in)
  x = (rng.normal(size=(4 * d_in, d_in)) @ mix) * rng.lognormal(sigma=0.7, size=d_in)
  x[:, list(dead)] = 0.0
  return rng.normal(size=(d_out, d_in)).astype(np.float32), x.astype(np.float32)


def stats_of(x, dtype=jnp.float32):
  """Exact statistics of ``x`` computed in float64 on the host, stored in ``dtype``."""
  x = x.astype(np.float64)
  g = x.T @ x
  return Stats(jnp.asarray(g, dtype), jnp.asarray(np.diag(g), dtype), jnp.asarray(x.shape[0], dtype))


def ref_kwargs(pattern):
  if isinstance(pattern, NM):
    return {"nm": (pattern.n, pattern.m)}
  return {"sparsity": pattern.sparsity} | ({"scope": pattern.scope} if pattern.scope else {})


def reference(name, w, stats, pattern, **hp):
  """The float64 reference's ``(w, mask, margin)``: ``margin`` is the smallest relative gap between a pruned and a
  kept score over all of its selections (see :func:`reference_np.selection_margins`)."""
  g, kw = np.asarray(stats.gram, np.float64), ref_kwargs(pattern) | hp
  with ref.selection_margins() as margins:
    if name == "magnitude":
      w_ref, mask = ref.magnitude(w, **kw)
    elif name == "wanda":
      w_ref, mask = ref.wanda(w, np.asarray(stats.sq_norms, np.float64), **kw)
    else:
      w_ref, mask = getattr(ref, name)(w, g, **kw)
  return w_ref, mask, min(margins, default=np.inf)


TRACES = collections.Counter()


@functools.cache
def jitted(name, pattern, **hp):
  """The jitted solver, shared by the tests (one compilation per input type); counts its traces."""
  solve = functools.partial(SOLVERS[name].solve, pattern=pattern, **(HPARAMS.get(name, {}) | hp))

  def traced(w, stats):
    TRACES[name, pattern] += 1
    return solve(w, stats)

  return jax.jit(traced)


def assert_same_solution(got, want_w, want_mask, margin, *, atol, min_margin):
  """``got`` has the reference's mask and its weights within ``atol · max |Ŵ|``; the reference's selections are
  at least ``min_margin`` from a tie (else rounding may decide them: the problem, not the solver, is wrong)."""
  assert margin >= min_margin, f"the test problem has a near-tie ({margin:.1e}): use another seed"
  np.testing.assert_array_equal(np.asarray(got.mask), want_mask)
  scale = np.abs(want_w).max()
  np.testing.assert_allclose(np.asarray(got.w, np.float64), want_w, rtol=0, atol=atol * scale)


def assert_as_reference_f32(got, want):
  assert_same_solution(got, *want, atol=tol.SOLVER_F32, min_margin=tol.MASK_MARGIN)


def assert_as_reference_f64(got, want):
  assert_same_solution(got, *want, atol=tol.SOLVER_F64, min_margin=tol.MASK_MARGIN_F64)


# ---------------------------------------------------------------- parity with the float64 references


@pytest.mark.parametrize("pattern", [Unstructured(0.8), NM(1, 4)], ids=str)
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_parity_x64(name, pattern):
  """Exact algorithm: the solvers in float64 equal the references to float64 rounding, including a dead input."""
  w, x = make_problem(dead=DEAD[:1])
  with jax.enable_x64(True):
    stats = stats_of(x, jnp.float64)
    got = jax.jit(functools.partial(SOLVERS[name].solve, pattern=pattern, **HPARAMS.get(name, {})))(
        jnp.asarray(w, jnp.float64), stats)
    assert got.w.dtype == jnp.float64
  assert_as_reference_f64(got, reference(name, w, stats, pattern, **HPARAMS.get(name, {})))


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_parity_float32(name, pattern):
  """The float32 solvers (as used) pick the reference's mask and its weights to float32 rounding."""
  w, x = make_problem(seed=1)
  stats = stats_of(x)
  want = reference(name, w, stats, pattern, **HPARAMS.get(name, {}))
  assert_as_reference_f32(jitted(name, pattern)(jnp.asarray(w), stats), want)


@pytest.mark.parametrize("hp", [
    {"pattern": Unstructured(0.6, scope="layer")},
    {"pattern": Unstructured(0.5, scope="layer"), "schedule": "final"},
    {"pattern": Unstructured(0.5), "mask_iterations": 0},
    {"pattern": NM(1, 4), "rho": 0.5, "percdamp": 0.05, "iterations": 12, "mask_iterations": 6},
], ids=str)
def test_admm_variants_parity_x64(hp):
  w, x = make_problem(seed=2)
  pattern, rest = hp["pattern"], {k: v for k, v in hp.items() if k != "pattern"}
  with jax.enable_x64(True):
    stats = stats_of(x, jnp.float64)
    got = admm(jnp.asarray(w, jnp.float64), stats, pattern=pattern, **rest)
  assert_as_reference_f64(got, reference("admm", w, stats, pattern, **rest))


@pytest.mark.parametrize("pattern", [Unstructured(0.6), NM(2, 4)], ids=str)
def test_admm_first_mask_is_wandas(pattern):
  """ADMM's mask from the preconditioned weights ``|W|·‖X_j‖`` (no re-selection) is Wanda's, per row by default."""
  w, x = make_problem(seed=12)
  stats = stats_of(x)
  got = admm(jnp.asarray(w), stats, pattern=pattern, mask_iterations=0)
  _, wanda_mask, margin = reference("wanda", w, stats, pattern)
  assert margin >= tol.MASK_MARGIN
  np.testing.assert_array_equal(np.asarray(got.mask), wanda_mask)


def test_admm_update_parity_x64_and_improves_with_iterations():
  w, x = make_problem(seed=3)
  mask = np.random.default_rng(3).random(w.shape) > 0.6
  with jax.enable_x64(True):
    stats = stats_of(x, jnp.float64)
    got = admm_update(jnp.asarray(w, jnp.float64), stats, mask=jnp.asarray(mask))
    few = admm_update(jnp.asarray(w, jnp.float64), stats, mask=jnp.asarray(mask), iterations=2)
  assert_as_reference_f64(got, (*ref.admm_update(w, np.asarray(stats.gram), mask), np.inf))  # no selection
  assert float(got.error) < float(few.error) < ref.error(w, np.where(mask, w, 0), np.asarray(stats.gram))


@pytest.mark.parametrize("name", ["magnitude", "sparsegpt"])
def test_threshold_tie_rule_parity_x64(name):
  """``ties="threshold"`` equals the reference codes' ``score <= sort(score)[int(s·n)]`` on weights with many ties."""
  w, x = make_problem(seed=13)
  w = np.round(w * 4) / 4  # few distinct values, as in a dequantized model
  pattern, hp = Unstructured(0.5), {**HPARAMS.get(name, {}), "ties": "threshold", "blocksize": 16}
  hp = hp if name == "sparsegpt" else {"ties": "threshold"}
  with jax.enable_x64(True):
    stats = stats_of(x, jnp.float64)
    got = SOLVERS[name].solve(jnp.asarray(w, jnp.float64), stats, pattern=pattern, **hp)
    exact = SOLVERS[name].solve(jnp.asarray(w, jnp.float64), stats, pattern=pattern)
  # exact ties on purpose (margin 0): |w| is exact, and tied scores in one column share their divisor
  assert_same_solution(got, *reference(name, w, stats, pattern, **hp), atol=tol.SOLVER_F64, min_margin=0.0)
  pruned, count = int((~np.asarray(got.mask)).sum()), int((~np.asarray(exact.mask)).sum())
  assert pruned > count == int(0.5 * w.size)  # ties at the threshold go too


def test_sparsegpt_single_partial_block_parity_x64():
  w, x = make_problem(seed=4)  # d_in = 40 < the default block of 128
  with jax.enable_x64(True):
    stats = stats_of(x, jnp.float64)
    got = sparsegpt(jnp.asarray(w, jnp.float64), stats, pattern=Unstructured(0.7))
  assert_as_reference_f64(got, reference("sparsegpt", w, stats, Unstructured(0.7), blocksize=128))


# ---------------------------------------------------------------- one contract suite over every solver


def expected_pruned(name, pattern, d_out=D_OUT, d_in=D_IN):
  if isinstance(pattern, NM):
    return d_out * d_in // pattern.m * pattern.pruned
  s = pattern.sparsity
  if name == "sparsegpt":
    return sum(int(s * d_out * min(BLOCK, d_in - i)) for i in range(0, d_in, BLOCK))
  if (pattern.scope or ("row" if name == "wanda" else "layer")) == "row":
    return d_out * int(s * d_in)
  return int(s * d_out * d_in)


def check_contract(name, pattern, w, x, result, dtype):
  """Structure, polarity, dtype, finiteness, error field, update quality of one ``result``."""
  mask, w_out = np.asarray(result.mask), np.asarray(result.w.astype(jnp.float32), np.float64)
  assert result.w.dtype == dtype and result.w.shape == w.shape
  assert mask.dtype == bool and result.error.dtype == jnp.float32
  assert np.isfinite(w_out).all() and np.isfinite(float(result.error))
  assert (~mask).sum() == expected_pruned(name, pattern)
  if isinstance(pattern, NM):
    assert (mask.reshape(D_OUT, -1, pattern.m).sum(-1) == pattern.n).all()
  assert (w_out[~mask] == 0).all()
  w_in = np.asarray(jnp.asarray(w, dtype).astype(jnp.float32), np.float64)
  if name not in UPDATING:
    np.testing.assert_array_equal(w_out[mask], w_in[mask])
  g = (x.astype(np.float64).T @ x.astype(np.float64))
  direct = ref.error(w_in, w_out, g)
  np.testing.assert_allclose(float(result.error), direct, rtol=tol.ERROR_RTOL)
  if name in UPDATING:
    assert direct <= ref.error(w_in, np.where(mask, w_in, 0), g)
  return mask


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_contract(name, pattern):
  """Every solver, every pattern, float32 weights, two dead inputs."""
  w, x = make_problem(dead=DEAD, seed=5)
  out = jitted(name, pattern)(jnp.asarray(w), accumulate(init_stats(D_IN), jnp.asarray(x)))
  check_contract(name, pattern, w, x, out, jnp.float32)
  if name == "sparsegpt":
    assert (np.asarray(out.w)[:, list(DEAD)] == 0).all()


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)], ids=str)
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_contract_eager_and_bfloat16(name, pattern):
  """Eager and jit (both code paths: unstructured and N:M) each give the reference's solution; bfloat16 weights
  come back bfloat16."""
  w, x = make_problem(dead=DEAD, seed=11)
  stats = stats_of(x)
  want = reference(name, w, stats, pattern, **HPARAMS.get(name, {}))
  assert_as_reference_f32(jitted(name, pattern)(jnp.asarray(w), stats), want)
  assert_as_reference_f32(SOLVERS[name].solve(jnp.asarray(w), stats, pattern=pattern, **HPARAMS.get(name, {})), want)
  if isinstance(pattern, Unstructured):  # the dtype handling does not depend on the pattern
    bf16 = jitted(name, pattern)(jnp.asarray(w, jnp.bfloat16), stats)
    check_contract(name, pattern, w, x, bf16, jnp.bfloat16)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_invariant_to_statistics_scale(name):
  """The raw-sum convention is safe: with SparseGPT's (2/N)-scaled Gram and Wanda's mean, the solution is the
  reference's on the raw sums."""
  w, x = make_problem(seed=6)
  stats = stats_of(x)
  scaled = jax.tree.map(lambda a: a * jnp.float32(2 / x.shape[0]), stats)
  want = reference(name, w, stats, NM(2, 4), **HPARAMS.get(name, {}))
  assert_as_reference_f32(jitted(name, NM(2, 4))(jnp.asarray(w), stats), want)
  assert_as_reference_f32(jitted(name, NM(2, 4))(jnp.asarray(w), scaled), want)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_compiles_once(name):
  """New weights and statistics of the same shapes reuse the compiled solver."""
  fn = jitted(name, Unstructured(0.5))
  for seed in (7, 8, 9):
    w, x = make_problem(seed=seed)
    jax.block_until_ready(fn(jnp.asarray(w), stats_of(x)))
    if seed == 7:
      traces = TRACES[name, Unstructured(0.5)]
  assert traces >= 1 and TRACES[name, Unstructured(0.5)] == traces


SHARDED_CASES = [(name, "auto", Unstructured(0.5)) for name in sorted(SOLVERS)] + [
    ("sparsegpt", "explicit", Unstructured(0.5)),
    ("sparsegpt", "explicit", NM(1, 4)), ("admm", "explicit", NM(1, 4)), ("wanda", "explicit", NM(1, 4))]


@pytest.mark.parametrize("name, mode, pattern", SHARDED_CASES, ids=str)
def test_sharded_rows_equal_unsharded(name, mode, pattern):
  """Rows of ``w`` on a ``model`` axis of 8 devices: the reference's mask (global selections included) and
  weights, as unsharded (``test_parity_float32``).

  ``auto``: a plain ``NamedSharding`` and ``jit``; ``explicit``: sharding in types, traced under ``set_mesh``
  (explicit cases: SparseGPT's block selections, ADMM's gradual N:M, Wanda's rows and groups; the per-layer
  selection under explicit sharding is tested in test_patterns).
  """
  axis_type = AxisType.Explicit if mode == "explicit" else AxisType.Auto
  mesh = jax.make_mesh((8,), ("model",), axis_types=(axis_type,))
  w, x = make_problem(seed=9)
  stats = stats_of(x)
  sharded_w = jax.device_put(jnp.asarray(w), NamedSharding(mesh, P("model", None)))
  with jax.set_mesh(mesh) if mode == "explicit" else contextlib.nullcontext():
    got = jax.jit(functools.partial(SOLVERS[name].solve, pattern=pattern, **HPARAMS.get(name, {})))(sharded_w, stats)
  assert len(got.w.sharding.device_set) == 8
  want = reference(name, w, stats, pattern, **HPARAMS.get(name, {}))
  assert_as_reference_f32(got, want)
  g = np.asarray(stats.gram, np.float64)
  np.testing.assert_allclose(float(got.error), ref.error(w, np.asarray(got.w), g), rtol=tol.ERROR_RTOL)


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)], ids=str)
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_error_only_when_asked(name, pattern):
  """``with_error=False``: no error (``None``), the reference's mask and weights; by default the error equals the
  float64 trace of the returned weights. ``with_error`` is not a hyper-parameter of the command line."""
  w, x = make_problem(seed=14)
  stats = stats_of(x)
  want = reference(name, w, stats, pattern, **HPARAMS.get(name, {}))
  solve = functools.partial(SOLVERS[name].solve, pattern=pattern, **HPARAMS.get(name, {}))
  without = jax.jit(functools.partial(solve, with_error=False))(jnp.asarray(w), stats)
  assert without.error is None
  assert_as_reference_f32(without, want)
  default = jax.jit(solve)(jnp.asarray(w), stats)
  assert_as_reference_f32(default, want)
  g = np.asarray(stats.gram, np.float64)
  np.testing.assert_allclose(float(default.error), ref.error(w, np.asarray(default.w), g), rtol=tol.ERROR_RTOL)
  assert "with_error" not in solver_options(name)
  with pytest.raises(JaxpruneError, match="takes no option 'with_error'"):
    check_options(name, pattern, {"with_error": False})


def test_magnitude_without_statistics_error_only_when_asked():
  w, _ = make_problem(seed=15)
  got = SOLVERS["magnitude"].solve(jnp.asarray(w), None, pattern=Unstructured(0.5))
  np.testing.assert_allclose(float(got.error), np.sum((w.astype(np.float64) - np.asarray(got.w)) ** 2),
                             rtol=tol.ERROR_RTOL)
  assert SOLVERS["magnitude"].solve(jnp.asarray(w), None, pattern=Unstructured(0.5), with_error=False).error is None


@pytest.mark.parametrize("pattern", [Unstructured(0.6), NM(2, 4), NM(4, 8)], ids=str)
def test_sparsegpt_sub_blocks_parity_x64(pattern):
  """Blocks of 32 columns run as two sub-blocks of 16 (the later one updated by a product): the reference's
  column loop over whole blocks, in float64, including the zero-padded last block (40 = 32 + 8)."""
  assert importlib.import_module("jaxprune.prune.solvers._sparsegpt")._sub_width(32, pattern_m(pattern)) == 16
  w, x = make_problem(dead=DEAD, seed=14)
  with jax.enable_x64(True):
    stats = stats_of(x, jnp.float64)
    got = sparsegpt(jnp.asarray(w, jnp.float64), stats, pattern=pattern, blocksize=32)
  assert_as_reference_f64(got, reference("sparsegpt", w, stats, pattern, blocksize=32))


def pattern_m(pattern):
  return pattern.m if isinstance(pattern, NM) else 1


def test_sparsegpt_transposed_column_loop_equals_the_column_form():
  """The OBS column loop runs on the transposed sub-block, each column updating only the later ones; it computes
  the plain column loop (one rank-1 update of the whole block per column): both equal that loop in float64 to
  float32 rounding."""
  obs_columns = importlib.import_module("jaxprune.prune.solvers._sparsegpt")._obs_columns  # module, not the function
  rng = np.random.default_rng(12)
  w1 = jnp.asarray(rng.normal(size=(300, 16)), jnp.float32)
  u1 = jnp.asarray(np.triu(rng.normal(size=(16, 16)) / 8) + 2 * np.eye(16), jnp.float32)
  mask1 = jnp.asarray(rng.random((300, 16)) > 0.5)

  def column_form(w1, u1, mask1):
    def column(i, carry):
      w1, err1 = carry
      q = jnp.where(mask1[:, i], w1[:, i], 0)
      e = (w1[:, i] - q) / u1[i, i]
      w1 = (w1 - e[:, None] * u1[i][None, :]).at[:, i].set(q)
      return w1, err1.at[:, i].set(e)
    return jax.lax.fori_loop(0, w1.shape[1], column, (w1, jnp.zeros_like(w1)))

  with jax.enable_x64(True):
    want = [np.asarray(a) for a in jax.jit(column_form)(*(jnp.asarray(a, jnp.float64) for a in (w1, u1)), mask1)]
  plain = jax.jit(column_form)(w1, u1, mask1)
  transposed = jax.jit(lambda w, u, m: obs_columns(w.T, jnp.zeros_like(w.T), u, m.T, 0, w.shape[1]))(w1, u1, mask1)
  for got in (plain, [a.T for a in transposed]):
    for g, w in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=tol.SOLVER_F32 * np.abs(w).max())
  assert (want[1] != 0).any()  # some weights were pruned and their error spread


@pytest.mark.parametrize("percdamp, tokens", [(1.0, None), (0.0, 8)], ids=["heavy-damping", "retried-damping"])
def test_sparsegpt_error_from_its_own_errors_equals_the_trace(percdamp, tokens):
  """SparseGPT's error comes from the scaled errors of its columns, ``‖E‖² - δ‖ΔW‖²`` (:mod:`..._sparsegpt`), not
  from a product with ``G``: it equals the float64 trace of the returned weights also where the damping term
  ``δ‖ΔW‖²`` is large (``percdamp=1``) and where ``δ`` comes from a retried factorisation (a rank-deficient Gram
  with no damping), with dead inputs."""
  w, x = make_problem(dead=(3, 17), seed=12)
  x = x if tokens is None else x[:tokens]
  g = x.astype(np.float64).T @ x.astype(np.float64)
  out = jitted("sparsegpt", Unstructured(0.5), percdamp=percdamp)(jnp.asarray(w), stats_of(x))
  trace = ref.error(w.astype(np.float64), np.asarray(out.w, np.float64), g)
  np.testing.assert_allclose(float(out.error), trace, rtol=tol.ERROR_RTOL)


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)], ids=str)
@pytest.mark.parametrize("name", ["sparsegpt", "admm"])
def test_prepared_factor_gives_the_reference_solution(name, pattern):
  """The factorisation computed once by the solver's ``prepare`` step (the pass shares it across an input group)
  gives the float64 reference's solution, with dead inputs (SparseGPT: and a last column block that is padded, 40
  inputs in blocks of 16); the same factor serves weights of other output widths."""
  w, x = make_problem(dead=DEAD, seed=13)
  stats = stats_of(x)
  options = HPARAMS.get(name, {})
  factor = jax.jit(functools.partial(SOLVERS[name].prepare, **options))(stats)
  if name == "sparsegpt":
    assert factor.u.shape == (48, 48) and bool(factor.factored)
  solve = jax.jit(functools.partial(SOLVERS[name].solve, pattern=pattern, **options))
  for rows in (w, w[:8]):
    want = reference(name, rows, stats, pattern, **options)
    assert_as_reference_f32(solve(jnp.asarray(rows), stats, prepared=factor), want)


def test_prepared_factor_of_another_shape_or_without_gram_raises():
  w, x = make_problem(seed=14)
  stats = stats_of(x)
  with pytest.raises(JaxpruneError, match=r"does not fit weights \(24, 40\) with blocksize 16"):
    sparsegpt(jnp.asarray(w), stats, pattern=Unstructured(0.5), blocksize=16,
              prepared=sparsegpt_prepare(stats, blocksize=32))
  with pytest.raises(JaxpruneError, match="Gram"):
    sparsegpt_prepare(stats._replace(gram=None))
  with pytest.raises(JaxpruneError, match="percdamp"):
    sparsegpt_prepare(stats, percdamp=-1.0)
  with pytest.raises(JaxpruneError, match=r"does not fit weights \(24, 40\)"):
    admm(jnp.asarray(w), stats, pattern=Unstructured(0.5), prepared=admm_prepare(stats_of(x[:, :36])))
  with pytest.raises(JaxpruneError, match="rho"):
    admm_prepare(stats, rho=0.0)
  assert "prepared" not in solver_options("sparsegpt") and "prepared" not in solver_options("admm")


# ---------------------------------------------------------------- robustness and input errors


def test_sparsegpt_finite_when_cholesky_fails_without_damping():
  """A rank-deficient Gram (fewer tokens than inputs) with no damping: retried with more damping, finite."""
  w, x = make_problem(seed=10)
  stats = stats_of(x[:8])
  out = jitted("sparsegpt", Unstructured(0.5), percdamp=0.0)(jnp.asarray(w), stats)
  assert np.isfinite(np.asarray(out.w)).all()
  assert (~np.asarray(out.mask)).sum() == expected_pruned("sparsegpt", Unstructured(0.5))


def test_all_inputs_dead_is_finite():
  w, _ = make_problem(seed=11)
  stats = init_stats(D_IN)
  for name in SOLVERS:
    out = jitted(name, NM(2, 4))(jnp.asarray(w), stats)
    assert np.isfinite(np.asarray(out.w)).all() and float(out.error) == 0.0, name


def test_get_solver_lists_known_methods():
  assert get_solver("sparsegpt").solve is sparsegpt
  assert [SOLVERS[n].needs_gram for n in ("magnitude", "wanda", "sparsegpt", "admm")] == [False, False, True, True]
  with pytest.raises(JaxpruneError, match="admm, magnitude, sparsegpt, wanda"):
    get_solver("obs")


@pytest.mark.parametrize("call, match", [
    (lambda w, s: sparsegpt(w, s._replace(gram=None), pattern=NM(2, 4)), "Gram"),
    (lambda w, s: SOLVERS["wanda"].solve(w, None, pattern=NM(2, 4)), "statistics"),
    (lambda w, s: SOLVERS["wanda"].solve(w[:, :36], s, pattern=NM(2, 4)), "width 40"),
    (lambda w, s: SOLVERS["magnitude"].solve(w[:, :38], s, pattern=NM(2, 4)), "divisible by 4, got 38"),
    (lambda w, s: sparsegpt(w, s, pattern=NM(2, 8), blocksize=12), "multiple of the N:M group 8"),
    (lambda w, s: sparsegpt(w, s, pattern=Unstructured(0.5, scope="row")), "per column block"),
    (lambda w, s: admm(w, s, pattern=NM(2, 4), schedule="linear"), "schedule"),
    (lambda w, s: sparsegpt(w, s, pattern=NM(2, 4), ties="threshold"), "unstructured sparsity"),
    (lambda w, s: SOLVERS["magnitude"].solve(w, s, pattern=Unstructured(0.5), ties="all"), "count, threshold"),
    (lambda w, s: admm(w, s, pattern=NM(2, 4), mask_iterations=25), "cannot exceed"),
    (lambda w, s: admm(w, s, pattern=NM(2, 4), rho=0.0), "rho"),
    (lambda w, s: admm_update(w, s, mask=jnp.ones((3, 3), bool)), "mask shape"),
    (lambda w, s: SOLVERS["magnitude"].solve(w[0], s, pattern=NM(2, 4)), "d_out, d_in"),
    (lambda w, s: SOLVERS["wanda"].solve(w, s, pattern=NM(2, 4), with_error="yes"), "with_error must be True or"),
])
def test_bad_input_raises(call, match):
  w, x = make_problem(seed=12)
  with pytest.raises(JaxpruneError, match=match):
    call(jnp.asarray(w), stats_of(x))


def test_pass_programs_compile_without_gpu_autotuning_and_public_solvers_nest(monkeypatch):
  """The pass's per-linear programs compile with the solver compiler options (no autotuning) on a GPU backend and
  without options on the others (the CPU here); the public solvers carry none, so a user's own jit can call
  them."""
  from jaxprune.prune import _sequential as S, _surgeon_pass as SP, _surgeon_units as SU
  from jaxprune.prune.solvers._base import SOLVER_COMPILER_OPTIONS

  assert SOLVER_COMPILER_OPTIONS == {"xla_gpu_autotune_level": 0}
  programs = [*(S.jitted_solver(S.PruneSpec(m, Unstructured(0.5))) for m in SOLVERS), S._output_energy,
              SP.linear_inverses, SP.linear_costs, SP.update_elements, SP.update_rows_columns, SU.linear_unit_costs]
  for program in programs:
    assert dict(program.gpu._jit_info.compiler_options_kvs) == SOLVER_COMPILER_OPTIONS, program
    assert not program.plain._jit_info.compiler_options_kvs and program.jitted() is program.plain, program
  with monkeypatch.context() as m:
    m.setattr(jax, "default_backend", lambda: "gpu")
    assert all(program.jitted() is program.gpu for program in programs)
  w, x = make_problem()
  stats = stats_of(x)
  for name in SOLVERS:
    solve = get_solver(name).solve
    assert not solve._jit_info.compiler_options_kvs, name
    nested = jax.jit(lambda w, stats, solve=solve: solve(w, stats, pattern=NM(2, 4)).mask)(jnp.asarray(w), stats)
    direct = S.jitted_solver(S.PruneSpec(name, NM(2, 4)))(jnp.asarray(w), stats).mask
    np.testing.assert_array_equal(nested, direct)
  program = S.jitted_solver(S.PruneSpec("wanda", NM(2, 4)))  # the option is one XLA accepts (the CPU ignores it)
  np.testing.assert_array_equal(program.gpu(jnp.asarray(w), stats).mask, program(jnp.asarray(w), stats).mask)
