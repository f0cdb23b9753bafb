"""Structured LLM Surgeon by units (``jaxprune.prune._surgeon_units``): whole MLP units and GQA groups of heads.

The joint cost and update of a unit are checked in float64 against the constrained minimiser of
``½ δᵀFδ`` (``F`` block-diagonal over the unit's linears, ``G ⊗ A`` each) solved directly from its KKT system;
the allocation against its parameter budget; and a tiny GQA model (4 query heads on 2 KV heads, random weights)
pruned in two shots must shrink and compute the logits of the zeroed model it came from.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import jitted
import tolerances as tol

from jaxprune.cli import main
from jaxprune.errors import JaxpruneError
from jaxprune.models import _model as M
from jaxprune.models._compact import compact
from jaxprune.models._config import ModelConfig
from jaxprune.prune import _surgeon_pass as P, _surgeon_units as U
from jaxprune.prune.solvers import _surgeon as sg

VOCAB, SEQ, BATCH = 37, 16, 8
CONFIG = ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=4, max_position_embeddings=32, tie_word_embeddings=False,
                     qkv_bias=True)


def spd(n, rng):
  x = rng.normal(size=(3 * n, n)) * rng.lognormal(sigma=0.5, size=n)
  return x.T @ x / (3 * n)


def kkt(ws, fs, removed):
  """``(deltas, cost)``: argmin ``Σ ½ δ_lᵀ F_l δ_l`` s.t. ``(w_l + δ_l)[removed_l] = 0`` over the linears ``l``
  (the Fisher block-diagonal over them), solved directly on the concatenated ``vec`` (row-major)."""
  w = np.concatenate([x.ravel() for x in ws])
  q = np.concatenate([r.ravel() for r in removed])
  f = np.zeros((w.size, w.size))
  start = 0
  for x in fs:
    f[start:start + len(x), start:start + len(x)] = x
    start += len(x)
  d = np.zeros(w.size)
  d[q] = -w[q]
  d[~q] = np.linalg.solve(f[np.ix_(~q, ~q)], -f[np.ix_(~q, q)] @ d[q])
  parts = np.split(d, np.cumsum([x.size for x in ws])[:-1])
  return [p.reshape(x.shape) for p, x in zip(parts, ws)], 0.5 * d @ f @ d


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_unit_cost_and_update_are_the_joint_constrained_minimiser_x64(kind):
  """One unit (a KV head with its two query heads and their ``o_proj`` columns; or row ``j`` of gate and up and
  column ``j`` of down) across the linears of a layer: the summed block costs and the per-linear row/column
  updates equal the direct minimiser."""
  rng = np.random.default_rng(7)
  d, hd, per, inter = 6, 2, 2, 5
  if kind == "attn":  # q (2 groups · 2 heads · 2), k, v (2 · 2), o (6, 8); unit = group 1
    shapes, sides, sizes, unit = [(8, d), (4, d), (4, d), (d, 8)], ["rows"] * 3 + ["cols"], [per * hd, hd, hd,
                                                                                              per * hd], 1
  else:  # gate, up (5, 6), down (6, 5); unit 3
    shapes, sides, sizes, unit = [(inter, d), (inter, d), (d, inter)], ["rows", "rows", "cols"], [1, 1, 1], 3
  ws = [rng.normal(size=s) for s in shapes]
  factors = [(spd(s[1], rng), spd(s[0], rng)) for s in shapes]
  removed = []
  for w, side, size in zip(ws, sides, sizes):
    r = np.zeros(w.shape, bool)
    if side == "rows":
      r[unit * size:(unit + 1) * size] = True
    else:
      r[:, unit * size:(unit + 1) * size] = True
    removed.append(r)
  deltas, cost = kkt(ws, [np.kron(g, a) for a, g in factors], removed)
  got_cost = 0.0
  with jax.enable_x64(True):
    for w, (a, g), side, size, r, want in zip(ws, factors, sides, sizes, removed, deltas):
      inv = (jnp.asarray(np.linalg.inv(a)), jnp.asarray(np.linalg.inv(g)), jnp.zeros(a.shape[0], bool),
             jnp.zeros(g.shape[0], bool))
      count = (w.shape[0] if side == "rows" else w.shape[1]) // size
      costs = np.asarray(U.linear_unit_costs(jnp.asarray(w), jnp.asarray(a), jnp.asarray(g), inv, side=side,
                                             size=size, count=count))
      got_cost += costs[unit]
      new = sg.remove_rows_columns(jnp.asarray(w), inv[0], inv[1], jnp.asarray(~r.all(axis=1)),
                                   jnp.asarray(~r.all(axis=0)))
      np.testing.assert_allclose(np.asarray(new) - w, want, rtol=0, atol=tol.SOLVER_F64 * np.abs(w).max())
  np.testing.assert_allclose(got_cost, cost, rtol=tol.SOLVER_F64)


def test_allocation_meets_the_budget_within_one_unit():
  rng = np.random.default_rng(3)
  layers, per = 4, 10
  layer = np.repeat(np.arange(layers), 2 * per)
  kind = np.tile(np.repeat([0, 1], per), layers)
  sizes = np.where(kind == 0, 50, 7).astype(np.int64)
  c = U.Candidates(rng.exponential(size=layer.size), sizes, layer, kind, np.tile(np.arange(per), 2 * layers))
  for budget in (0, 1, 123, 700, 1500):
    removed, threshold = U.choose(c, budget, 0.3)
    order = np.argsort(c.costs / sizes, kind="stable")
    taken = int(removed.sum())
    assert removed[order[:taken]].all()  # a prefix of the order of cost per parameter: one threshold
    assert threshold == (c.costs[order[taken - 1]] / sizes[order[taken - 1]] if taken else -np.inf)
    assert sizes[removed].sum() <= budget
    if taken < c.costs.size:
      assert budget - sizes[removed].sum() < sizes[order[taken]]  # short by less than the next unit
  with pytest.raises(JaxpruneError, match="would remove every group of heads of layer") as err:
    U.choose(U.Candidates(np.where(kind == 0, -1.0, 1.0), sizes, layer, kind, c.index), 50 * per + 7, 0.3)
  assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def params():
  """Random weights (at 30 % in two shots both kinds of unit go: groups of heads from layer 1, MLP units from both)."""
  return jax.tree.map(np.asarray, M.init_params(CONFIG, jax.random.key(0)))


@pytest.fixture(scope="module")
def calib():
  return np.random.default_rng(1).integers(0, VOCAB, size=(16, SEQ)).astype(np.int32)


@pytest.fixture(scope="module")
def states(params, calib):
  out = []
  P.run_surgeon(params, CONFIG, P.SurgeonSpec(P.Units(0.3), shots=2), calib, batch_size=BATCH,
                on_shot=out.append, progress=False)
  return out


def test_each_shot_meets_its_parameter_target_and_keeps_what_earlier_shots_removed(params, states):
  total = P.count_params(params)
  unit_sizes = [CONFIG.hidden_size * 3, 2 * CONFIG.head_dim * (CONFIG.hidden_size + 1) * 2
                + 2 * CONFIG.head_dim * CONFIG.hidden_size]  # MLP unit; group of heads (q, k, v with bias; o)
  previous = None
  for i, state in enumerate(states, 1):
    report = state.reports[-1]
    assert report["target_pruned"] == int(total * 0.3 * i / 2 if i < 2 else total * 0.3)
    assert 0 <= report["target_pruned"] - report["pruned"] < max(unit_sizes)
    keep = np.concatenate([m.ravel() for block in state.masks for _, m in sorted(block.items())])
    if previous is not None:
      assert not (keep & ~previous).any()
    previous = keep
    for block, masks in zip(state.params["layers"], state.masks):
      for path, m in masks.items():
        np.testing.assert_array_equal(m, np.outer(m.any(axis=1), m.any(axis=0)))  # whole rows and columns
        node = block[path.split("/")[0]][path.split("/")[1]]
        assert (node["kernel"][~m] == 0).all()
        if "bias" in node:
          assert (node["bias"][~m.any(axis=0)] == 0).all()
  small, config, _ = compact(states[-1].params, CONFIG)
  assert P.count_params(small) == total - states[-1].reports[-1]["pruned"]
  inter = [w[0] for w in config.layer_widths]
  kv = [w[2] for w in config.layer_widths]
  assert min(kv) < CONFIG.num_kv_heads and min(inter) < CONFIG.intermediate_size  # both kinds of unit left
  assert all(w[1] == 2 * w[2] for w in config.layer_widths)  # query heads left with their KV head


def test_shrunk_model_computes_what_the_zeroed_one_does(states, calib):
  small, config, _ = compact(states[-1].params, CONFIG)
  tokens = jnp.asarray(calib[:2])
  want = jitted.forward(states[-1].params, tokens, config=CONFIG)
  tol.assert_reordered(jitted.forward(small, tokens, config=config), want, "logits")


def test_magnitude_units_removes_the_smallest_rms_units(params):
  pruned, masks, removed = U.magnitude_units(params, CONFIG, U.Units(0.3))
  total = P.count_params(params)
  assert 0 <= int(total * 0.3) - removed < 3 * CONFIG.head_dim * CONFIG.hidden_size * 4
  small, _, _ = compact(pruned, CONFIG)
  assert P.count_params(small) == total - removed
  block = params["layers"][0]["mlp"]
  rms = np.sqrt((block["gate_proj"]["kernel"] ** 2).sum(0) + (block["up_proj"]["kernel"] ** 2).sum(0)
                + (block["down_proj"]["kernel"] ** 2).sum(1))
  gone = ~masks[0]["mlp/gate_proj"].any(axis=0)
  if gone.any() and (~gone).any():
    assert rms[gone].max() <= rms[~gone].min()


def test_bad_input_is_one_line(params, calib):
  with pytest.raises(JaxpruneError, match="would remove every") as err:
    P.run_surgeon(params, CONFIG, P.SurgeonSpec(P.Units(0.9)), calib, batch_size=BATCH, progress=False)
  assert "\n" not in str(err.value)
  with pytest.raises(JaxpruneError, match="allocation 'layer' does not apply"):
    P.check_surgeon_spec(P.SurgeonSpec(P.Units(0.2), allocation="layer"))


def test_cli_units_writes_a_shrunk_checkpoint_and_json(params, calib, tmp_path, capsys):
  from jaxprune.io import load_checkpoint
  from jaxprune.io._checkpoint import save_checkpoint

  save_checkpoint(tmp_path / "tiny", CONFIG, params)
  np.save(tmp_path / "calib.npy", calib)
  base = ["prune", "--model", str(tmp_path / "tiny"), "--method", "surgeon", "--calib", str(tmp_path / "calib.npy"),
          "--seqlen", str(SEQ), "--nsamples", str(len(calib)), "--batch-size", str(BATCH), "--structured", "units"]
  code = main([*base, "--sparsity", "0.2", "--out", str(tmp_path / "s"), "--json", str(tmp_path / "s.json")])
  doc = json.loads((tmp_path / "s.json").read_text())
  assert code == 0 and doc["pattern"] == "units:0.2" and doc["params_before"] == P.count_params(params)
  assert 0 < doc["params_before"] - doc["params_after"] <= int(0.2 * doc["params_before"])
  saved = load_checkpoint(tmp_path / "s")
  assert sum(np.size(x) for x in jax.tree.leaves(saved.params)) == doc["params_after"]
  assert [list(saved.config.widths(i)) for i in range(CONFIG.num_layers)] == doc["layer_widths"]
  capsys.readouterr()
  code = main([*base, "--sparsity", "0.9", "--out", str(tmp_path / "bad")])
  lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
  assert code == 2 and len(lines) == 1 and "would remove every" in lines[0]
