"""Retraining after every shot of LLM Surgeon (``jaxprune.prune._surgeon_retrain``; ``jaxprune prune --method surgeon
--retrain``) on a tiny random LLaMA with q/k/v biases, calibrated and retrained on windows of a Markov chain.

Retraining must change the kept weights, keep every pruned weight (and the bias of every removed row) exactly 0,
leave each shot's target met, lower the training loss on its windows, feed the next shot's curvature, keep
structured units shrinking (also from a model that already has per-layer widths), resume to the same bits after a
crash between shots or inside a retraining, and refuse bad input in one line.
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
from jaxprune.prune import Unstructured, _surgeon_pass as P, _surgeon_retrain as R
from jaxprune.runner import Runner

from test_surgeon_pass import CONFIG, SEQ, chain  # its model (two linear shapes: few compilations), untrained

BATCH = 8
RETRAIN = P.Retraining("biases,norms,masklora:4", steps=4, lr=1e-2, batch_size=2)  # one spec: one compilation


@pytest.fixture(scope="module")
def params():
  return jax.tree.map(np.asarray, M.init_params(CONFIG, jax.random.key(0)))


@pytest.fixture(scope="module")
def calib():
  return chain(16, 1)


@pytest.fixture(scope="module")
def train():
  return chain(16, 2)


def _states(params, calib, pattern, shots, retrain=None, train=None, config=CONFIG):
  states = []
  P.run_surgeon(params, config, P.SurgeonSpec(pattern, shots=shots, chunk=64, retrain=retrain), calib,
                batch_size=BATCH, on_shot=states.append, progress=False, train_windows=train)
  return states


def _kernels(state):
  return [(i, path, np.asarray(state.params["layers"][i][path.split("/")[0]][path.split("/")[1]]["kernel"]), keep)
          for i, block in enumerate(state.masks) for path, keep in sorted(block.items())]


@pytest.fixture(scope="module")
def unstructured(params, calib, train):
  return {"plain": _states(params, calib, Unstructured(0.5), 2),
          "retrained": _states(params, calib, Unstructured(0.5), 2, RETRAIN, train)}


def test_retraining_changes_kept_weights_keeps_every_zero_and_the_target(unstructured):
  states = unstructured["retrained"]
  assert [s.done for s in states] == [1, 1, 2, 2]
  assert ["retrain" in s.reports[-1] for s in states] == [False, True, False, True]
  for pruned, retrained in (states[0:2], states[2:4]):
    for (_, _, before, keep), (_, _, after, keep2) in zip(_kernels(pruned), _kernels(retrained), strict=True):
      np.testing.assert_array_equal(keep2, keep)
      assert (after[~keep] == 0).all() and (after[keep] != 0).all()
    changed = [(after != before)[keep].mean() for (_, _, before, keep), (_, _, after, _) in
               zip(_kernels(pruned), _kernels(retrained))]
    assert min(changed) > 0.9  # MaskLoRA moves (almost) every kept weight of every linear
  total = sum(k.size for _, _, k, _ in _kernels(states[-1]))
  zeros = sum(int((k == 0).sum()) for _, _, k, _ in _kernels(states[-1]))
  assert zeros == states[-1].reports[-1]["pruned"] == int(total * 0.5)
  # the second shot's curvature saw the retrained weights: it prunes other weights than without retraining
  plain = np.concatenate([m.ravel() for _, _, _, m in _kernels(unstructured["plain"][-1])])
  assert (np.concatenate([m.ravel() for _, _, _, m in _kernels(states[-1])]) != plain).any()


def test_training_loss_on_the_shots_windows_is_lower_after_retraining(unstructured, train):
  states = unstructured["retrained"]
  for shot, (pruned, retrained) in enumerate((states[0:2], states[2:4]), 1):
    report = retrained.reports[-1]["retrain"]
    assert report["rows"] == RETRAIN.steps * RETRAIN.batch_size == 8 and report["first_row"] == 8 * (shot - 1)
    assert report["loss_after"] < report["loss_before"], report
    rows = train[R.shot_rows(shot, 8, len(train))]
    for params, key in ((pruned.params, "loss_before"), (retrained.params, "loss_after")):
      losses = Runner(CONFIG, batch_size=3).window_losses(params, jnp.asarray(rows))  # other batching
      tol.assert_reordered(np.float64(report[key]), np.mean(np.asarray(losses, np.float64)), key)


@pytest.fixture(scope="module")
def units(params, calib, train):
  return _states(params, calib, P.Units(0.3), 2, RETRAIN, train)


@pytest.mark.slow  # about 30 s (its own three-shot units pass); the default suite keeps the unstructured one
def test_units_with_retrained_biases_shrink_and_keep_removed_rows_zero(params, calib, units):
  states = units
  for state in states[1::2]:
    for block, masks in zip(state.params["layers"], state.masks):
      for path, m in masks.items():
        node = block[path.split("/")[0]][path.split("/")[1]]
        np.testing.assert_array_equal(m, np.outer(m.any(axis=1), m.any(axis=0)))  # whole units
        assert (node["kernel"][~m] == 0).all()
        if "bias" in node:
          assert (node["bias"][~m.any(axis=0)] == 0).all()
  assert states[-1].reports[-1]["pruned"] > 0 and states[-1].reports[-1]["retrain"]["loss_after"] > 0
  small, config, _ = compact(states[-1].params, CONFIG)
  assert config.layer_widths and P.count_params(small) == P.count_params(params) - states[-1].reports[-1]["pruned"]
  tokens = jnp.asarray(calib[:2])
  tol.assert_reordered(jitted.forward(small, tokens, config=config),
                       jitted.forward(states[-1].params, tokens, config=CONFIG), "logits")


@pytest.mark.slow  # about 30 s: every linear of the shrunk model has a new shape, so everything compiles again
def test_a_model_with_per_layer_widths_retrains_with_adapters_of_each_linears_shape(calib, train, units):
  small, config, _ = compact(units[-1].params, CONFIG)
  again = _states(small, calib, P.Units(0.1), 2, RETRAIN, train, config=config)
  for state in again[1::2]:
    assert state.reports[-1]["retrain"]["loss_after"] < state.reports[-1]["retrain"]["loss_before"]
    for _, _, kernel, keep in _kernels(state):
      assert (kernel[~keep] == 0).all()
  small_again, config_again, _ = compact(again[-1].params, config)
  assert P.count_params(small_again) == P.count_params(small) - again[-1].reports[-1]["pruned"]


def _crash_on(monkeypatch, target, name, when):
  """Makes ``target.name`` raise right after its call ``when(args)`` returns true (the call itself completes)."""
  original = getattr(target, name)

  def wrapped(*args, **kw):
    out = original(*args, **kw)
    if when(args):
      raise _Crash
    return out

  monkeypatch.setattr(target, name, wrapped)


class _Crash(Exception):
  pass


def test_resume_between_shots_and_inside_a_retraining_gives_the_same_bits(params, calib, train, tmp_path,
                                                                           monkeypatch):
  from jaxprune.retrain import _state

  spec = P.SurgeonSpec(Unstructured(0.5), shots=2, chunk=64, retrain=RETRAIN)

  def run():
    return P.surgeon_prune(params, calib, config=CONFIG, spec=spec, out=tmp_path / "ck", identity={"model": "tiny"},
                           batch_size=BATCH, progress=False, train_windows=train)

  whole = P.surgeon_prune(params, calib, config=CONFIG, spec=spec, batch_size=BATCH, progress=False,
                          train_windows=train)
  _crash_on(monkeypatch, P.ShotStore, "save", lambda a: "retrain" in a[1].reports[-1] and a[1].done == 1)
  with pytest.raises(_Crash):
    run()  # killed after shot 1's retraining was saved
  monkeypatch.undo()
  _crash_on(monkeypatch, _state, "save_state", lambda a: a[2]["identity"]["surgeon_shot"] == 2 and a[2]["step"] == 2)
  with pytest.raises(_Crash):
    run()  # killed in shot 2's retraining, after its step 2 was saved
  monkeypatch.undo()
  calls = []
  for module, name in ((P, "surgeon_shot"), (R, "retrain_shot")):
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda state, *a, _f=original, _n=name, **k: calls.append((_n, state.done))
                        or _f(state, *a, **k))
  again = run()
  assert calls == [("retrain_shot", 2)]  # neither shot pruned again, shot 2's retraining resumed
  assert again.metadata["shots_report"][1]["retrain"]["resumed_from"] == 2
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(again.params), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(whole.metadata["shots_report"], again.metadata["shots_report"]):
    assert a["retrain"]["loss_after"] == b["retrain"]["loss_after"]


@pytest.fixture(scope="module")
def biasless():
  config = CONFIG.replace(qkv_bias=False)
  return config, jax.tree.map(np.asarray, M.init_params(config, jax.random.key(1)))


@pytest.mark.parametrize("retrain, windows, match", [
    (P.Retraining(steps=0), "train", "retraining steps must be an integer >= 1, got 0"),
    (P.Retraining(steps=-3), "train", "retraining steps must be an integer >= 1, got -3"),
    (P.Retraining("bias,norms"), "train", "unknown trainable subset 'bias'"),
    (P.Retraining("lora:4"), "train", "plain lora between shots would fill the pruned weights"),
    (P.Retraining(lr=0.0), "train", "learning rate must be a finite number > 0"),
    (P.Retraining(batch_size=0), "train", "batch size must be an integer >= 1"),
    (P.Retraining(steps=9), "train", "needs 18 training windows, got 16"),
    (P.Retraining(), None, "needs training windows"),
    (P.Retraining("biases"), "biasless", "would add zero biases to every linear"),
    (None, "train", "training windows given without retraining"),
])
def test_bad_input_is_one_line(params, calib, train, biasless, retrain, windows, match):
  config, model = (biasless if windows == "biasless" else (CONFIG, params))
  with pytest.raises(JaxpruneError, match=match) as err:
    P.run_surgeon(model, config, P.SurgeonSpec(Unstructured(0.5), shots=2, retrain=retrain), calib,
                  batch_size=BATCH, progress=False, train_windows=None if windows is None else train)
  assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def files(params, calib, train, tmp_path_factory):
  from jaxprune.io._checkpoint import save_checkpoint

  root = tmp_path_factory.mktemp("surgeon-retrain-cli")
  save_checkpoint(root / "tiny", CONFIG, params)
  np.save(root / "calib.npy", calib)
  np.save(root / "train.npy", train)
  np.save(root / "eval.npy", chain(4, 3))
  return root


def _cli(files, capsys, *argv, method="surgeon"):
  code = main(["prune", "--model", str(files / "tiny"), "--method", method, "--calib", str(files / "calib.npy"),
               "--seqlen", str(SEQ), "--nsamples", "16", "--batch-size", str(BATCH), *map(str, argv)])
  captured = capsys.readouterr()
  return code, captured.err + captured.out


def test_cli_retrains_after_each_shot_and_records_it(files, capsys, tmp_path):
  code, err = _cli(files, capsys, "--sparsity", 0.5, "--shots", 2, "--chunk", 64, "--retrain", str(RETRAIN.train),
                   "--retrain-steps", 2, "--retrain-lr", 0.01, "--retrain-data", files / "train.npy",
                   "--eval", files / "eval.npy", "--out", tmp_path / "u", "--json", tmp_path / "u.json")
  assert code == 0, err
  doc = json.loads((tmp_path / "u.json").read_text())
  assert doc["retrain"] == {**RETRAIN.to_json(), "steps": 2, "lr": 0.01}
  assert doc["retrain_data"] == str(files / "train.npy")
  assert doc["sparsity"] == pytest.approx(0.5, abs=1e-3) and len(doc["train_windows_sha256"]) == 64
  for report in doc["shots_report"]:
    r = report["retrain"]
    assert r["loss_after"] < r["loss_before"] and r["seconds"] >= r["train_seconds"] > 0
    assert r["batch"] == 8 and r["rows"] == 16  # 2 windows a step rounded up to the 8 devices of the mesh
  assert "training loss" in err and "->" in err


@pytest.mark.parametrize("argv, needle", [
    (("--retrain", "norms", "--retrain-steps", 0), "--retrain-steps must be at least 1, got 0"),
    (("--retrain", "bogus"), "unknown trainable subset 'bogus'"),
    (("--retrain", "lora:4"), "plain lora between shots would fill the pruned weights"),
    (("--retrain-steps", 5), "--retrain-steps needs --retrain SUBSETS"),
    (("--retrain", "norms", "--retrain-steps", 3), "needs 24 training windows, got 16"),
    (("--retrain", "norms", "--eval", "TRAIN"), "--retrain-data and --eval are the same token file"),
])
def test_cli_bad_input_is_one_line(files, capsys, tmp_path, argv, needle):
  argv = [files / "train.npy" if a == "TRAIN" else a for a in argv]
  code, err = _cli(files, capsys, "--shots", 2, "--retrain-data" if "--retrain" in argv else "--chunk",
                   files / "train.npy" if "--retrain" in argv else 64, "--out", tmp_path / "out", *argv)
  lines = [line for line in err.splitlines() if "error:" in line]
  assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
  code, err = _cli(files, capsys, "--retrain", "norms", "--out", tmp_path / "w", method="wanda")
  assert code == 2 and "--retrain applies to --method surgeon only" in err
