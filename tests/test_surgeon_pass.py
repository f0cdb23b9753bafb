"""LLM Surgeon over a whole model (``jaxprune.prune._surgeon_pass``) and ``jaxprune prune --method surgeon`` on a
tiny LLaMA trained for a few seconds on a random Markov chain (so that its curvature means something).

Every linear of the model is ``(32, 32)``, plus a bias on q/k/v (Qwen2-style), so two weight shapes serve all
compilations. The allocation must meet each shot's target exactly (one element; within one row or column for
rows and columns), keep what earlier shots pruned, leave pruned weights exactly 0, and compile once per shape;
8 simulated devices must give the one-device result; a killed run must resume to the same bits; and on its
calibration data the pruned model must not be worse than magnitude pruning at the same sparsity.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import jitted
import tolerances as tol

from jaxprune.cli import main
from jaxprune.errors import JaxpruneError
from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig
from jaxprune.prune import NM, Unstructured
from jaxprune.prune import _job as job, _surgeon_pass as P
from jaxprune.prune._sequential import PruneSpec
from jaxprune.prune.solvers import _surgeon as sg
from jaxprune.runner import Runner, _forward as F, make_mesh
from jaxprune._evaluate import perplexity

VOCAB, SEQ, WINDOWS, BATCH = 61, 16, 32, 8
CONFIG = ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_layers=2,
                     num_heads=4, num_kv_heads=4, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
                     qkv_bias=True)
SUCCESSORS = np.random.default_rng(0).integers(0, VOCAB, size=(VOCAB, 2))  # each token has two next tokens


def chain(n: int, seed: int) -> np.ndarray:
  """``(n, SEQ)`` int32 windows of the Markov chain (perplexity 2 is the best a model can do)."""
  rng = np.random.default_rng(seed)
  x = np.zeros((n, SEQ), np.int32)
  x[:, 0] = rng.integers(0, VOCAB, n)
  for t in range(1, SEQ):
    x[:, t] = SUCCESSORS[x[:, t - 1], rng.integers(0, 2, n)]
  return x


@pytest.fixture(scope="module")
def params():
  """The tiny model after 120 Adam steps on the chain (dense perplexity about 2.2 against 61 untrained)."""
  params = M.init_params(CONFIG, jax.random.key(0))
  runner, opt = Runner(CONFIG, batch_size=16), optax.adam(1e-2)
  state, weights = opt.init(params), jnp.ones((16,), jnp.float32)

  @jax.jit
  def step(grads, state, params):
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int32 and float
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

  for s in range(120):
    _, grads = runner.loss_and_grad(params, jnp.asarray(chain(16, 100 + s)), weights)
    params, state = step(grads, state, params)
  return jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def calib():
  return chain(WINDOWS, 1)


def _run(params, calib, pattern, shots, **kw):
  states = []
  P.run_surgeon(params, CONFIG, P.SurgeonSpec(pattern, shots=shots, chunk=64), calib, batch_size=BATCH,
                on_shot=states.append, progress=False, **kw)
  return states


def _flat(masks) -> np.ndarray:
  return np.concatenate([m.ravel() for block in masks for _, m in sorted(block.items())])


CASES = {"unstructured 0.6 x3": (Unstructured(0.6), 3), "2:4 x2": (NM(2, 4), 2),
         "rows,cols 0.06 x2": (P.RowsColumns(0.06), 2)}


@pytest.fixture(scope="module")
def runs(params, calib):
  return {name: _run(params, calib, *case) for name, case in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_each_shot_meets_its_target_and_keeps_what_earlier_shots_pruned(runs, params, name):
  pattern, shots = CASES[name]
  states = runs[name]
  assert [s.done for s in states] == list(range(1, shots + 1))
  total = _flat(states[0].masks).size
  previous = np.ones(total, bool)
  for i, state in enumerate(states, 1):
    keep = _flat(state.masks)
    pruned = int((~keep).sum())
    assert state.reports[-1]["pruned"] == pruned
    assert not (keep & ~previous).any()  # pruned weights stay pruned
    previous = keep
    for block, masks, dense in zip(state.params["layers"], state.masks, params["layers"]):
      for path, m in masks.items():
        kernel = np.asarray(block[path.split("/")[0]][path.split("/")[1]]["kernel"])
        assert (kernel[~m] == 0).all() and (kernel[m] != 0).all()
    if isinstance(pattern, Unstructured):
      assert pruned == int(total * pattern.sparsity * i / shots if i < shots else total * pattern.sparsity)
    elif isinstance(pattern, NM):
      assert pruned == total // 4 * i // shots * 2
      for masks in state.masks:
        for m in masks.values():
          kept = m.T.reshape(m.shape[1], -1, 4).sum(-1)  # (d_out, d_in / 4) kept per group
          assert set(np.unique(kept)) <= ({2, 4} if i < shots else {2})
    else:
      budget = int(total * pattern.sparsity * i / shots if i < shots else total * pattern.sparsity)
      assert 0 <= budget - pruned < 32  # short by less than one row or column
      for masks in state.masks:
        for m in masks.values():
          np.testing.assert_array_equal(m, np.outer(m.any(axis=1), m.any(axis=0)))  # whole rows and columns
  layer_sparsity = [r["sparsity"] for r in states[-1].reports[-1]["layers"]]
  if isinstance(pattern, NM):
    assert layer_sparsity == [0.5] * len(layer_sparsity)
  else:
    assert len(set(layer_sparsity)) > (3 if isinstance(pattern, Unstructured) else 1)  # one global threshold


def test_biases_are_kept_or_removed_with_their_rows(runs, params):
  unstructured, structured = runs["unstructured 0.6 x3"][-1], runs["rows,cols 0.06 x2"][-1]
  for layer in range(CONFIG.num_layers):
    for name in ("q_proj", "k_proj", "v_proj"):
      dense = params["layers"][layer]["self_attn"][name]["bias"]
      assert (unstructured.params["layers"][layer]["self_attn"][name]["bias"] != 0).all()  # updated, not pruned
      bias = structured.params["layers"][layer]["self_attn"][name]["bias"]
      removed = ~structured.masks[layer][f"self_attn/{name}"].any(axis=0)  # whole output rows
      assert (bias[removed] == 0).all() and (bias[~removed] != 0).all() and dense.shape == bias.shape
  assert any((~m.any(axis=0)).any() for masks in structured.masks for m in masks.values())


def test_structured_update_is_the_joint_minimiser_x64():
  """Rows with ``G⁻¹`` then columns with ``A⁻¹``: the constrained minimiser of ``½ vec(ΔW)ᵀ (G ⊗ A) vec(ΔW)``
  with the removed rows and columns at 0, solved directly from the KKT system on the kept entries."""
  rng = np.random.default_rng(4)
  w = rng.normal(size=(5, 8))
  a, g = [(lambda x: x.T @ x / (3 * n))(rng.normal(size=(3 * n, n))) for n in (8, 5)]
  rows, cols = np.array([1, 0, 1, 1, 0], bool), np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
  removed = ~np.outer(rows, cols).ravel()
  f = np.kron(g, a)
  want = -w.ravel() * removed
  want[~removed] = np.linalg.solve(f[np.ix_(~removed, ~removed)], f[np.ix_(~removed, removed)] @ w.ravel()[removed])
  with jax.enable_x64(True):
    got = sg.remove_rows_columns(jnp.asarray(w), jnp.asarray(np.linalg.inv(a)), jnp.asarray(np.linalg.inv(g)),
                                 jnp.asarray(rows), jnp.asarray(cols))
  np.testing.assert_allclose(np.asarray(got).ravel(), w.ravel() + want, atol=1e-10)


@pytest.mark.parametrize("fraction, chunk", [(0.5, 7), (0.15, 50)])
def test_element_update_over_windows_equals_the_chunked_reference_x64(fraction, chunk):
  """``remove_elements`` holds each window of 16 rows' update back and applies it once; on 37 rows (3 windows,
  the last padded) with chunks inside one window (50 %) and chunks longer than a window (15 %, 50 a chunk) it is
  the reference's chunked update on the full ``F⁻¹ = G⁻¹ ⊗ A⁻¹`` (each chunk solved on the current weights)."""
  rng = np.random.default_rng(7)
  w = rng.normal(size=(37, 16))
  a_inv, g_inv = [np.linalg.inv((lambda x: x.T @ x / (3 * n))(rng.normal(size=(3 * n, n)))) for n in (16, 37)]
  keep = rng.random(w.shape) >= fraction
  f_inv, want = np.kron(g_inv, a_inv), w.ravel().copy()
  removed = np.flatnonzero(~keep.ravel())
  assert sg._WINDOW_ROWS == 16 and (chunk < 10 or removed[chunk - 1] // 16 > removed[0] // 16)  # spans windows
  for s in range(0, removed.size, chunk):
    ids = removed[s:s + chunk]
    want -= f_inv[:, ids] @ np.linalg.solve(f_inv[np.ix_(ids, ids)], want[ids])
  with jax.enable_x64(True):
    got = jax.jit(lambda *x: sg.remove_elements(*x, chunk=chunk))(*map(jnp.asarray, (w, a_inv, g_inv, keep)))
  np.testing.assert_allclose(np.asarray(got), np.where(keep, want.reshape(w.shape), 0), atol=1e-10)


def test_compiles_once_per_linear_shape(params, calib):
  """14 linears of two shapes (q/k/v with a bias, (32, 33); the others (32, 32)), two shots: two compilations of
  each per-linear function (options no other test uses, so that the count starts from nothing) and none of the
  curvature pass (the module's earlier runs compiled it)."""
  P.linear_costs.clear_cache()
  fns = (P.linear_inverses, P.linear_costs, P.update_elements, F.curvature_step)
  before = [f._cache_size() for f in fns]
  spec = P.SurgeonSpec(Unstructured(0.5), shots=2, damping_a=0.011, chunk=63)
  P.run_surgeon(params, CONFIG, spec, calib, batch_size=BATCH, progress=False)
  added = [f._cache_size() - n for f, n in zip(fns, before)]
  assert added[:3] == [2, 2, 2] and added[3] == (1 if before[3] == 0 else 0)


def test_eight_devices_and_a_model_axis_equal_one_device(params, calib):
  """A data mesh of 8 and a ``(data, model)`` mesh of 4 × 2 give the masks and weights of one device."""
  assert jax.device_count() == 8
  one = _run(params, calib, Unstructured(0.3), 1)[0]
  for mesh in (make_mesh(), make_mesh(model=2)):
    sharded = _run(params, calib, Unstructured(0.3), 1, mesh=mesh)[0]
    np.testing.assert_array_equal(_flat(sharded.masks), _flat(one.masks))
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(sharded.params)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())


class _Crash(Exception):
  pass


def test_resume_after_a_crash_gives_the_same_bits(params, calib, tmp_path, monkeypatch):
  spec = P.SurgeonSpec(Unstructured(0.5), shots=2, chunk=64)
  whole = P.surgeon_prune(params, calib, config=CONFIG, spec=spec, batch_size=BATCH, progress=False)
  save = P.ShotStore.save

  def crash(self, state):
    save(self, state)
    raise _Crash

  monkeypatch.setattr(P.ShotStore, "save", crash)
  with pytest.raises(_Crash):
    P.surgeon_prune(params, calib, config=CONFIG, spec=spec, out=tmp_path / "ck", identity={"model": "tiny"},
                    batch_size=BATCH, progress=False)
  monkeypatch.undo()
  shots = []
  shot = P.surgeon_shot
  monkeypatch.setattr(P, "surgeon_shot", lambda state, *a, **k: shots.append(state.done) or shot(state, *a, **k))
  again = P.surgeon_prune(params, calib, config=CONFIG, spec=spec, out=tmp_path / "ck", identity={"model": "tiny"},
                          batch_size=BATCH, progress=False)
  assert shots == [1]  # only the second shot ran
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(again.params), strict=True):
    np.testing.assert_array_equal(a, b)
  assert whole.metadata["per_layer_sparsity"] == again.metadata["per_layer_sparsity"]
  with pytest.raises(JaxpruneError, match="different run"):
    P.ShotStore(tmp_path / "ck", CONFIG, {"model": "other"}).load(params)


def test_layer_allocation_prunes_every_linear_by_the_same_fraction(params, calib):
  """``allocation="layer"``: each linear loses exactly ``⌊s·size⌋`` weights (its own lowest costs), against the
  global threshold's uneven split; rows and columns: each linear within one row or column of its share."""
  def spec(pattern, allocation):
    return P.SurgeonSpec(pattern, chunk=64, allocation=allocation)

  state = P.run_surgeon(params, CONFIG, spec(Unstructured(0.6), "layer"), calib, batch_size=BATCH, progress=False)
  for masks in state.masks:
    for m in masks.values():
      assert int((~m).sum()) == int(m.size * 0.6)
  structured = P.run_surgeon(params, CONFIG, spec(P.RowsColumns(0.1), "layer"), calib, batch_size=BATCH,
                             progress=False)
  for masks in structured.masks:
    for m in masks.values():
      assert 0 <= int(m.size * 0.1) - int((~m).sum()) < max(m.shape)
  with pytest.raises(JaxpruneError, match="allocation must be one of global, layer"):
    P.run_surgeon(params, CONFIG, spec(Unstructured(0.6), "uniform"), calib, batch_size=BATCH, progress=False)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_not_worse_than_magnitude_on_the_calibration_data(params, calib, sparsity):
  """A check that can fail: surgeon's global, curvature-aware pruning against magnitude at the same sparsity. With
  8 calibration windows instead of 32 it does fail at 50 % (2.45 against 2.33: the curvature of 128 tokens is too
  noisy); with 32 surgeon measured 2.31 against 2.36 at 50 % and 2.86 against 3.37 at 70 %."""
  surgeon = _run(params, calib, Unstructured(sparsity), 1)[-1].params
  magnitude = job.prune(params, None, config=CONFIG, spec=PruneSpec("magnitude", Unstructured(sparsity)),
                        progress=False).params
  ppl = {name: perplexity(p, calib, config=CONFIG, progress=False).perplexity
         for name, p in (("dense", params), ("surgeon", surgeon), ("magnitude", magnitude))}
  assert ppl["dense"] < 3 and ppl["dense"] <= ppl["surgeon"] <= ppl["magnitude"], ppl


@pytest.mark.parametrize("spec, match", [
    (P.SurgeonSpec(Unstructured(0.5), shots=0), "shots must be an integer >= 1"),
    (P.SurgeonSpec(Unstructured(0.5, scope="row")), "scope does not apply"),
    (P.SurgeonSpec(Unstructured(0.5), fisher_labels="true"), "fisher labels"),
    (P.SurgeonSpec(Unstructured(0.5), chunk=0), "chunk"),
    (P.SurgeonSpec(NM(2, 3)), "divisible by 3"),
    (P.SurgeonSpec(P.RowsColumns(0.9)), "would remove every head of layer"),
])
def test_bad_input_is_one_line(params, calib, spec, match):
  with pytest.raises(JaxpruneError, match=match) as err:
    P.run_surgeon(params, CONFIG, spec, calib, batch_size=BATCH, progress=False)
  assert "\n" not in str(err.value)
  with pytest.raises(JaxpruneError, match=r"\[0, 1\)"):
    P.RowsColumns(1.0)


@pytest.fixture(scope="module")
def files(params, calib, tmp_path_factory):
  from jaxprune.io._checkpoint import save_checkpoint

  root = tmp_path_factory.mktemp("surgeon-cli")
  save_checkpoint(root / "tiny", CONFIG, params)
  np.save(root / "calib.npy", calib)
  return root


def _cli(files, capsys, *argv):
  code = main(["prune", "--model", str(files / "tiny"), "--method", "surgeon", "--calib", str(files / "calib.npy"),
               "--seqlen", str(SEQ), "--nsamples", str(WINDOWS), "--batch-size", str(BATCH), *map(str, argv)])
  return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (("--shots", 0), "--shots must be at least 1, got 0"),
    (("--nm", "2:4", "--structured", "rows,cols"), "cannot be combined with --nm"),
    (("--structured", "rows"), "--structured takes rows,cols"),
    (("--structured", "rows,cols"), "--structured needs --sparsity"),
    (("--structured", "rows,cols", "--sparsity", 0.9), "would remove every head of layer"),
    (("--blocksize", 8), "--blocksize does not apply to surgeon"),
])
def test_cli_bad_input_is_one_line(files, capsys, tmp_path, argv, needle):
  code, err = _cli(files, capsys, "--out", tmp_path / "out", *argv)
  lines = [line for line in err.splitlines() if "error:" in line]
  assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_cli_wrong_method_for_surgeon_options(files, capsys, tmp_path):
  code = main(["prune", "--model", str(files / "tiny"), "--method", "magnitude", "--shots", "2", "--out",
               str(tmp_path / "m")])
  assert code == 2 and "--shots applies to --method surgeon only" in capsys.readouterr().err


def test_cli_writes_checkpoint_and_json(files, capsys, tmp_path):
  code, _ = _cli(files, capsys, "--sparsity", 0.5, "--shots", 2, "--chunk", 64, "--out", tmp_path / "u",
                 "--eval", files / "calib.npy", "--eval-seqlen", SEQ, "--json", tmp_path / "u.json")
  assert code == 0
  doc = json.loads((tmp_path / "u.json").read_text())
  assert doc["method"] == "surgeon" and doc["shots"] == 2 and doc["pattern"] == "unstructured:0.5"
  assert doc["sparsity"] == pytest.approx(0.5, abs=1e-3) and 1 < doc["perplexity"] < 4
  assert len(doc["per_layer_sparsity"]) == CONFIG.num_layers and len(doc["shots_report"]) == 2
  assert "params_before" not in doc
  code, _ = _cli(files, capsys, "--structured", "rows,cols", "--sparsity", 0.05, "--out", tmp_path / "s",
                 "--json", tmp_path / "s.json")
  doc = json.loads((tmp_path / "s.json").read_text())
  assert code == 0 and doc["pattern"] == "rows_columns:0.05"
  assert doc["params_before"] == sum(np.size(x) for x in jax.tree.leaves(M.init_params(CONFIG, jax.random.key(0))))
  assert doc["params_kept"] <= doc["params_after"] <= doc["params_before"]  # hidden-size rows stay as zeros
  from jaxprune.io import load_checkpoint

  saved = load_checkpoint(tmp_path / "s")
  assert sum(np.size(x) for x in jax.tree.leaves(saved.params)) == doc["params_after"]
  assert [list(saved.config.widths(i)) for i in range(CONFIG.num_layers)] == doc["layer_widths"]


def test_structured_model_shrinks_and_computes_what_the_zeroed_one_does(params, calib):
  """Rows and columns, a quarter of every linear: the MLP units and head groups whose rows or columns went leave
  the model (per-layer widths); its logits equal those of the pruned model before shrinking."""
  from jaxprune.models._compact import compact

  state = P.run_surgeon(params, CONFIG, P.SurgeonSpec(P.RowsColumns(0.25), chunk=64, allocation="layer"), calib,
                        batch_size=BATCH, progress=False)
  small, config, _ = compact(state.params, CONFIG)
  assert config.layer_widths and any(w != (CONFIG.intermediate_size, CONFIG.num_heads, CONFIG.num_kv_heads)
                                     for w in config.layer_widths)
  want = jitted.forward(state.params, calib[:2], config=CONFIG)
  tol.assert_reordered(jitted.forward(small, calib[:2], config=config), want, "logits")
