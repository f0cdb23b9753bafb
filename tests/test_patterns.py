"""Sparsity patterns (validation, N:M meaning, CLI parsing) and the exact mask selection of ``masks``.

Masks are compared bit for bit with the NumPy reference: the scores are small integers (many exact ties) or
distinct values given as is, so every selection is exact in any order of evaluation, on any machine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import reference_np as ref
from jaxprune.errors import JaxpruneError
from jaxprune.prune import (
    NM, Unstructured, keep_mask, layer_mask, nm_mask, num_pruned, parse_pattern, pattern_mask, unstructured_mask)

# ---------------------------------------------------------------- patterns


def test_nm_counts_kept_weights():
  assert NM(1, 4).sparsity == 0.75 and NM(1, 4).pruned == 3
  assert NM(2, 4).sparsity == 0.5 and NM(4, 8).sparsity == 0.5
  assert NM(3, 4).sparsity == 0.25
  mask = np.asarray(nm_mask(jnp.arange(16.0).reshape(2, 8), n=1, m=4))
  assert mask.tolist() == [[False, False, False, True] * 2, [False, False, False, True] * 2]


def test_patterns_are_frozen_and_hashable():
  with pytest.raises(dataclasses.FrozenInstanceError):
    NM(2, 4).n = 1
  assert len({NM(2, 4), NM(2, 4), Unstructured(0.5), Unstructured(0.5, scope=None)}) == 2
  assert Unstructured(1 / 2) == Unstructured(0.5) and isinstance(Unstructured(0).sparsity, float)


@pytest.mark.parametrize("make, match", [
    (lambda: Unstructured(1.0), r"\[0, 1\)"),
    (lambda: Unstructured(-0.1), r"\[0, 1\)"),
    (lambda: Unstructured(float("nan")), r"\[0, 1\)"),
    (lambda: Unstructured(True), r"\[0, 1\)"),
    (lambda: Unstructured("0.5"), r"\[0, 1\)"),
    (lambda: Unstructured(0.5, scope="block"), "scope"),
    (lambda: NM(0, 4), "positive"),
    (lambda: NM(2, 0), "positive"),
    (lambda: NM(-1, 4), "positive"),
    (lambda: NM(2.0, 4), "positive"),
    (lambda: NM(5, 4), "n <= m"),
])
def test_bad_patterns_raise(make, match):
  with pytest.raises(JaxpruneError, match=match):
    make()


def test_check_width_names_the_width():
  NM(2, 4).check_width(576)
  Unstructured(0.5).check_width(577)
  with pytest.raises(JaxpruneError, match="divisible by 8, got 1540"):
    NM(4, 8).check_width(1540)


def test_parse_pattern():
  assert parse_pattern(0.6, None) == Unstructured(0.6)
  assert parse_pattern(0.5, None, scope="row") == Unstructured(0.5, scope="row")
  assert parse_pattern(None, "2:4") == NM(2, 4)
  assert parse_pattern(None, " 1:4 ") == NM(1, 4)
  for sparsity, nm, match in [(None, None, "exactly one"), (0.5, "2:4", "exactly one"), (None, "2/4", "2:4"),
                              (None, "a:4", "2:4"), (None, "2:4:8", "2:4"), (None, "0:4", "positive"),
                              (None, "5:4", "n <= m"), (1.5, None, r"\[0, 1\)")]:
    with pytest.raises(JaxpruneError, match=match):
      parse_pattern(sparsity, nm)
  with pytest.raises(JaxpruneError, match="unstructured"):
    parse_pattern(None, "2:4", scope="row")


# ---------------------------------------------------------------- masks


def tied_scores(shape, seed=0):
  """Scores with many exact ties (few distinct values, as dequantized weights have)."""
  return np.random.default_rng(seed).integers(0, 5, size=shape).astype(np.float32)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_keep_mask_stable_tie_rule(use_jit):
  scores = tied_scores((6, 40))
  select = jax.jit(keep_mask) if use_jit else keep_mask
  for k in (0, 1, 13, 20, 39, 40):
    got = np.asarray(select(jnp.asarray(scores), k))
    want = np.stack([ref.lowest_pruned(row, k) for row in scores])
    np.testing.assert_array_equal(got, want)
    assert (~got).sum(axis=1).tolist() == [k] * 6


# Compiled, XLA once simplified ``x + 0.0`` (meant to make -0.0 equal +0.0) to ``x``: the jitted run is the one
# that matters (one program for every count); the eager one compiles each operation and runs with the slow tests.
@pytest.mark.parametrize("use_jit", [pytest.param(False, marks=pytest.mark.slow), True], ids=["eager", "jit"])
def test_selection_orders_negative_zero_and_infinite_scores(use_jit):
  scores = np.array([[0.0, -0.0, -2.5, 3.0, np.inf, -np.inf, 1e-30, -1e-30, 0.0, 7.0]], np.float32)
  rows_select, layer_select = (jax.jit(keep_mask), jax.jit(layer_mask)) if use_jit else (keep_mask, layer_mask)
  for k in range(scores.size + 1):
    want = ref.lowest_pruned(scores[0], k)
    np.testing.assert_array_equal(np.asarray(rows_select(jnp.asarray(scores), k))[0], want)
    np.testing.assert_array_equal(np.asarray(layer_select(jnp.asarray(scores), k))[0], want)


def test_selection_in_float64_under_x64():
  scores = np.random.default_rng(9).normal(size=(7, 9))
  scores[2, 3] = scores[4, 1] = scores[0, 0]
  with jax.enable_x64(True):
    got = np.asarray(layer_mask(jnp.asarray(scores), 31))
  np.testing.assert_array_equal(got, ref.lowest_pruned(scores.ravel(), 31).reshape(scores.shape))


def test_keep_mask_lower_index_pruned_first():
  assert np.asarray(keep_mask(jnp.array([2.0, 1.0, 1.0, 1.0, 0.5]), 3)).tolist() == [True, False, False, True, False]


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_layer_mask_exact_with_ties_and_traced_count(use_jit):
  scores = tied_scores((12, 30), seed=1)
  select = jax.jit(layer_mask) if use_jit else layer_mask
  for k in (0, 7, 180, 359):
    got = np.asarray(select(jnp.asarray(scores), jnp.int32(k)))
    np.testing.assert_array_equal(got, ref.lowest_pruned(scores.ravel(), k).reshape(scores.shape))


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("sparsity, scope", [(0.5, "layer"), (0.8, "layer"), (0.37, "row"), (0.0, "row")])
def test_unstructured_mask_counts(use_jit, sparsity, scope):
  scores = tied_scores((10, 24), seed=2)
  fn = lambda s: unstructured_mask(s, sparsity=sparsity, scope=scope)  # noqa: E731
  got = np.asarray((jax.jit(fn) if use_jit else fn)(jnp.asarray(scores)))
  np.testing.assert_array_equal(got, ref.unstructured_keep(scores, sparsity, scope))
  size = scores.size if scope == "layer" else scores.shape[1]
  pruned = (~got).sum() if scope == "layer" else (~got).sum(axis=1)
  assert np.all(pruned == num_pruned(size, sparsity)) and num_pruned(size, sparsity) == int(size * sparsity)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 4), (4, 4)])
def test_nm_mask_structure(use_jit, n, m):
  scores = tied_scores((5, 32), seed=3)
  fn = lambda s: nm_mask(s, n=n, m=m)  # noqa: E731
  got = np.asarray((jax.jit(fn) if use_jit else fn)(jnp.asarray(scores)))
  np.testing.assert_array_equal(got, ref.nm_keep(scores, n, m))
  assert (got.reshape(5, -1, m).sum(-1) == n).all()


def test_pattern_mask_dispatch():
  host = tied_scores((4, 16), seed=4)
  scores = jnp.asarray(host)
  np.testing.assert_array_equal(pattern_mask(scores, NM(1, 4), default_scope="layer"), ref.nm_keep(host, 1, 4))
  np.testing.assert_array_equal(pattern_mask(scores, Unstructured(0.5), default_scope="row"),
                                ref.unstructured_keep(host, 0.5, "row"))
  np.testing.assert_array_equal(pattern_mask(scores, Unstructured(0.5, scope="layer"), default_scope="row"),
                                ref.unstructured_keep(host, 0.5, "layer"))
  with pytest.raises(JaxpruneError, match="divisible by 8, got 20"):
    pattern_mask(jnp.ones((2, 20)), NM(4, 8), default_scope="row")


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_layer_mask_row_sharded_equals_unsharded(axis_type):
  """Many ties (the tie cut is searched): per layer and per row, on rows of 12 and of 4096 (several halvings)."""
  mesh = jax.make_mesh((8,), ("model",), axis_types=(axis_type,))
  for shape, k_layer, k_row in (((16, 12), 77, 5), ((16, 4096), 30001, 1999)):
    scores = tied_scores(shape, seed=5)
    sharded = jax.device_put(jnp.asarray(scores), NamedSharding(mesh, P("model", None)))
    with jax.set_mesh(mesh):
      got = jax.jit(lambda s: layer_mask(s, k_layer))(sharded)  # noqa: B023
      rows = jax.jit(lambda s: keep_mask(s, k_row))(sharded)  # noqa: B023
    np.testing.assert_array_equal(np.asarray(got), ref.lowest_pruned(scores.ravel(), k_layer).reshape(shape))
    np.testing.assert_array_equal(np.asarray(rows), np.stack([ref.lowest_pruned(row, k_row) for row in scores]))


@pytest.mark.parametrize("axis_type", [None, AxisType.Auto, AxisType.Explicit], ids=["one-device", "auto", "explicit"])
def test_selection_that_needs_no_tie_break_equals_the_stable_rule(axis_type):
  """Where no slice has more scores tied at its threshold than it still prunes (distinct scores, or every tie
  pruned), the selection skips the cumulative tie rank; the masks stay those of the stable rule."""
  scores = np.random.default_rng(6).permutation(192).reshape(16, 12).astype(np.float32)
  scores[scores < 5] = 0.0  # five tied zeros, all pruned when k = 5
  arr = jnp.asarray(scores)
  if axis_type is not None:
    mesh = jax.make_mesh((8,), ("model",), axis_types=(axis_type,))
    arr = jax.device_put(arr, NamedSharding(mesh, P("model", None)))
  with jax.set_mesh(mesh) if axis_type is not None else contextlib.nullcontext():
    for k in (5, 77):
      got = np.asarray(jax.jit(lambda s: layer_mask(s, k))(arr))  # noqa: B023
      np.testing.assert_array_equal(got, ref.lowest_pruned(scores.ravel(), k).reshape(scores.shape))
    got = np.asarray(jax.jit(lambda s: keep_mask(s, 4))(arr))
    np.testing.assert_array_equal(got, np.stack([ref.lowest_pruned(row, 4) for row in scores]))


# ---------------------------------------------------------------- the selection at width


@pytest.mark.parametrize("shape", [(3, 65), (5, 1000), (2, 2 ** 15), (1, 2 ** 22)], ids=str)
def test_count_is_exact_at_every_width(shape):
  """The halving count equals NumPy's: odd widths, and partial counts that outgrow uint8 (2^15) and int16 (2^22)."""
  count = importlib.import_module("jaxprune.prune._masks")._count
  pred = np.random.default_rng(8).random(shape) < 0.9
  pred[0] = True  # the largest count of every partial sum
  np.testing.assert_array_equal(np.asarray(jax.jit(count, static_argnums=1)(jnp.asarray(pred), (1,)))[:, 0],
                                pred.sum(axis=1))
  assert int(count(jnp.asarray(pred), (0, 1))[0, 0]) == pred.sum()


def mixed_scores(shape, seed):
  """Continuous scores (ties rare) in the even rows, few distinct values (the tie cut needed) in the odd rows."""
  rng = np.random.default_rng(seed)
  scores = np.abs(rng.normal(size=shape)).astype(np.float32)
  scores[1::2] = np.round(scores[1::2] * 4) / 4
  return scores


# Eager selection is held to the reference at small widths above; at width 4096 it runs with the slow tests.
@pytest.mark.parametrize("use_jit", [pytest.param(False, marks=pytest.mark.slow), True], ids=["eager", "jit"])
def test_selection_at_width_4096_equals_the_stable_reference(use_jit):
  """Per row and per layer at a model's width, continuous and tied rows together: every radix stage, both tie
  paths; the reference is a stable float64 sort."""
  scores = mixed_scores((24, 4096), seed=9)
  rows_select = jax.jit(keep_mask) if use_jit else keep_mask
  layer_select = jax.jit(layer_mask) if use_jit else layer_mask
  for k in (1, 2048, 3000):
    got = np.asarray(rows_select(jnp.asarray(scores), k))
    np.testing.assert_array_equal(got, np.stack([ref.lowest_pruned(row.astype(np.float64), k) for row in scores]))
  for k in (12 * 4096, 70001):
    got = np.asarray(layer_select(jnp.asarray(scores), k))
    np.testing.assert_array_equal(got, ref.lowest_pruned(scores.ravel().astype(np.float64), k).reshape(scores.shape))
  continuous = scores[::2]  # no tie at the threshold: only the radix select runs
  for sparsity in (0.5, 0.7):
    got = np.asarray(unstructured_mask(jnp.asarray(continuous), sparsity=sparsity, scope="layer"))
    np.testing.assert_array_equal(got, ref.unstructured_keep(continuous.astype(np.float64), sparsity, "layer"))
    assert (~got).sum() == num_pruned(continuous.size, sparsity)


def test_threshold_rule_at_width_4096():
  scores = mixed_scores((8, 4096), seed=10)
  for axes_scope in ("layer", "row"):
    got = np.asarray(unstructured_mask(jnp.asarray(scores), sparsity=0.5, scope=axes_scope, ties="threshold"))
    if axes_scope == "layer":
      want = ref.unstructured_keep(scores.astype(np.float64), 0.5, "layer", ties="threshold")
    else:
      want = np.stack([row > np.sort(row)[2048] for row in scores])
    np.testing.assert_array_equal(got, want)


def test_selection_with_ties_in_float64_under_x64():
  """64-bit keys (eight radix stages) and the tie cut, per row and per layer."""
  scores = tied_scores((6, 300), seed=11).astype(np.float64) + 1e-300  # zeros become 1e-300: not a float32
  scores[0] = np.random.default_rng(11).normal(size=300)
  with jax.enable_x64(True):
    rows = np.asarray(jax.jit(keep_mask)(jnp.asarray(scores), 123))
    layer = np.asarray(jax.jit(layer_mask)(jnp.asarray(scores), 901))
  np.testing.assert_array_equal(rows, np.stack([ref.lowest_pruned(row, 123) for row in scores]))
  np.testing.assert_array_equal(layer, ref.lowest_pruned(scores.ravel(), 901).reshape(scores.shape))
