"""Retraining end to end (jaxprune.retrain and ``jaxprune retrain``) on a tiny pruned LLaMA: masked fine-tuning keeps
every pruned zero, adapters merge without losing one, frozen leaves stay bit-identical, 8 devices equal one, a killed
run resumes to the same bits, one compilation per shape, and bad input gets one line.

Runs share compilations: the same model, window shape (8 windows of 16 tokens) and specs wherever a test allows.
"""
from __future__ import annotations

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jitted

from jaxprune.cli import main
from jaxprune.errors import JaxpruneError
from jaxprune.io import save_checkpoint
from jaxprune.models import _model as M
from jaxprune.prune._job import mask_tree
from jaxprune.runner import Runner, _forward as F, make_mesh
from test_retrain_parts import LLAMA, V, _prune, _random_params

R = importlib.import_module("jaxprune.retrain")  # the package: the attribute jaxprune.retrain is the function
SEQ, BATCH = 16, 8


@pytest.fixture(scope="module")
def pruned():
  """A LLaMA magnitude-pruned to 50 % per kernel, and its masks."""
  return _prune(_random_params(LLAMA, 0))


def _skewed(n: int, seed: int) -> np.ndarray:
  """``n`` windows of tokens drawn from one skewed unigram distribution, so that a few steps lower the loss."""
  p = np.random.default_rng(1).dirichlet(np.full(V, 0.3))
  return np.random.default_rng(seed).choice(V, size=(n, SEQ), p=p).astype(np.int32)


@pytest.fixture(scope="module")
def windows():
  return _skewed(64, 2)


def _train(params, masks, spec, windows, *, steps, lr=1e-2, **kwargs):
  return R.retrain(params, LLAMA, masks, spec, windows, steps=steps, batch_size=BATCH, lr=lr, epochs=True,
                   progress=False, **kwargs)


def _kernels(params):
  return {(i, p): np.asarray(R._subsets.get_path(b, p)["kernel"]) for i, b in enumerate(params["layers"])
          for p in R.linear_paths(b)}


def _one_line(excinfo):
  assert "\n" not in str(excinfo.value) and str(excinfo.value)


# ---------------------------------------------------------------------------------------- masked fine-tuning

def test_masked_fine_tuning_keeps_every_pruned_weight_zero_after_50_steps(pruned, windows):
  params, masks = pruned
  seen = []

  def check(step, metrics):  # after every step, not only at the end
    seen.append(metrics["loss"])

  before = F.loss_and_grad._cache_size()
  result = _train(params, masks, "all", windows, steps=50, weight_decay=0.1, on_step=check)
  assert F.loss_and_grad._cache_size() == before + 1  # one compilation for 50 steps
  assert R._train._optimizer(1e-2, 50, 0.1, 0.1, 1.0, 1, True)[1]._cache_size() == 1
  assert len(seen) == 50 and result.losses[-1] < 0.9 * result.losses[0]
  old, new = _kernels(params), _kernels(result.params)
  for (i, path), kernel in new.items():
    mask = np.asarray(masks[i][path])
    assert np.all(kernel[~mask] == 0.0) and np.all(kernel[mask] != old[i, path][mask]), path
  assert result.sparsity == R.linear_sparsity(params) == 0.5
  assert result.trainable_fraction == 1.0 and result.tokens == 50 * BATCH * SEQ
  assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(result.params)))


def test_sparse_model_without_masks_is_refused_for_all_and_masklora(pruned, windows):
  params, masks = pruned
  for spec in ("all", "masklora:4"):
    with pytest.raises(JaxpruneError, match="mask-from-zeros") as e:
      _train(params, None, spec, windows, steps=1)
    _one_line(e)
  with pytest.raises(JaxpruneError, match="allow_densify") as e:
    _train(params, masks, "lora:4", windows, steps=1)
  _one_line(e)
  measured = R.prepare(params, LLAMA, None, "all", mask_from_zeros=True)[2]
  assert all(np.array_equal(m[p], np.asarray(masks[i][p])) for i, m in enumerate(measured) for p in m)


# -------------------------------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("kind", ["masklora", "scalelora"])
def test_merged_adapters_keep_every_zero_and_equal_the_unmerged_model(kind, pruned, windows):
  params, masks = pruned
  spec = R.parse_train_spec(f"{kind}:4")
  result = _train(params, masks, spec, windows, steps=50)
  assert result.losses[-1] < result.losses[0] and result.merged and result.sparsity == 0.5
  unmerged = _train(params, masks, spec, windows, steps=50, merge_adapters=False)
  for a, b in zip(jax.tree.leaves(unmerged.params), jax.tree.leaves(params)):  # frozen weights: the same bits
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(unmerged.adapters), jax.tree.leaves(result.adapters)):  # same run twice
    np.testing.assert_array_equal(a, b)
  old, new = _kernels(params), _kernels(result.params)
  for (i, path), kernel in new.items():
    mask = np.asarray(masks[i][path])
    assert np.all(kernel[~mask] == 0.0) and np.all(kernel[mask] != 0.0), path
    assert not np.array_equal(kernel, old[i, path]), path  # the adapters trained
  # Logits of the merged weights against the adapters applied on the fly inside the jitted forward.
  tokens = jnp.asarray(windows[:BATCH])
  on_the_fly = jax.jit(lambda p, a, t: M.forward(R.apply(p, a, masks, spec), t, config=LLAMA))
  want = np.asarray(on_the_fly(params, unmerged.adapters, tokens))
  merged = np.asarray(jitted.forward(result.params, tokens, config=LLAMA))
  assert np.abs(merged - want).max() <= 1e-5 * np.abs(want).max()


def test_biases_on_llama_add_zero_biases_that_train(pruned):
  params, masks = pruned
  prepared, config, _, spec = R.prepare(params, LLAMA, masks, "biases,norms")
  assert (config.qkv_bias, config.o_bias, config.mlp_bias) == (True, True, True)
  mask = R.trainable_mask(prepared, spec)
  biases, norms = 24 + 12 + 12 + 24 + 40 + 40 + 24, 2 * 24  # per block: q, k, v, o, gate, up, down; two RMSNorms
  assert R.count(prepared, mask)[0] == 2 * (biases + norms) + 24  # and the final norm


# ------------------------------------------------------------------------------------- devices, resuming

STEPS, LR = 4, 1e-2  # the command tests' settings: the same compiled update


def test_eight_devices_and_a_model_axis_equal_one_device(pruned, windows):
  """A data mesh of 8 and a ``(data, model)`` mesh of 4 × 2 train as one device does."""
  params, masks = pruned
  one = _train(params, masks, "all", windows, steps=STEPS, lr=LR)
  for mesh in (make_mesh(), make_mesh(model=2)):
    sharded = _train(params, masks, "all", windows, steps=STEPS, lr=LR, mesh=mesh)
    # The losses are means over 8 x 15 float32 token losses summed in another order on 8 devices; AdamW's update
    # is lr * m / (sqrt(v) + eps), so a relative difference d of the gradients moves a weight by at most ~lr * d a
    # step.
    np.testing.assert_allclose(sharded.losses, one.losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(one.params)):
      assert np.abs(np.asarray(a) - np.asarray(b)).max() <= STEPS * LR * 1e-3
    assert sharded.sparsity == one.sparsity == 0.5


def test_killed_run_resumes_to_the_same_bits(pruned, windows, tmp_path):
  params, masks = pruned

  class Killed(Exception):
    pass

  def kill_after(step, _):
    if step == 3:
      raise Killed

  whole = _train(params, masks, "all", windows, steps=STEPS, lr=LR)
  with pytest.raises(Killed):
    _train(params, masks, "all", windows, steps=STEPS, lr=LR, state_dir=tmp_path, save_every=2, on_step=kill_after)
  saved = R._state.read_progress(tmp_path)
  assert saved["step"] == 2 and saved["position"] == 2 * BATCH and len(saved["losses"]) == 2
  resumed = _train(params, masks, "all", windows, steps=STEPS, lr=LR, state_dir=tmp_path, save_every=2)
  assert resumed.resumed_from == 2
  np.testing.assert_array_equal(resumed.losses, whole.losses)
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(whole.params)):
    np.testing.assert_array_equal(a, b)  # the same computation: the same bits
  with pytest.raises(JaxpruneError, match="different run") as e:  # another run's state is not mixed in
    _train(params, masks, "all", windows, steps=STEPS, lr=2e-2, state_dir=tmp_path)
  _one_line(e)


def test_bad_library_input_is_one_line(pruned, windows):
  params, masks = pruned
  for kwargs, needle in ((dict(spec="lora:0"), "rank"), (dict(spec="weights"), "unknown"),
                         (dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"), (dict(steps=0), "steps"),
                         (dict(epochs=False, steps=9), "exceed")):
    args = {"spec": "norms", "steps": 1, "epochs": True, **kwargs}
    with pytest.raises(JaxpruneError, match=needle) as e:
      R.retrain(params, LLAMA, masks, args.pop("spec"), windows, batch_size=BATCH, progress=False, **args)
    _one_line(e)


# ---------------------------------------------------------------------------------------------------- command

@pytest.fixture(scope="module")
def files(pruned, windows, tmp_path_factory):
  """A pruned checkpoint with its masks, a dense one, and training / evaluation windows as .npy files."""
  root = tmp_path_factory.mktemp("retrain")
  params, masks = pruned
  save_checkpoint(root / "pruned", LLAMA, params, masks=mask_tree(R.block_masks(masks, 2)))
  save_checkpoint(root / "dense", LLAMA, _random_params(LLAMA, 0))
  np.save(root / "train.npy", windows)
  np.save(root / "eval.npy", _skewed(8, 3))
  return root


def run(capsys, *argv):
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def _args(files, out, *extra):
  return ("retrain", "--model", files / "pruned", "--data", files / "train.npy", "--steps", STEPS, "--batch-size",
          BATCH, "--lr", LR, "--out", out, *extra)


def test_command_end_to_end_writes_a_checkpoint_eval_reads(files, tmp_path, capsys, monkeypatch):
  argv = _args(files, tmp_path / "ck", "--train", "all", "--eval", files / "eval.npy", "--json",
               tmp_path / "r.json", "--save-every", 2)
  with monkeypatch.context() as m:  # keep the train state, to damage it below
    m.setattr(R._state, "clear_state", lambda _: None)
    code, _, err = run(capsys, *argv)
  assert code == 0, err
  doc = json.loads((tmp_path / "r.json").read_text())
  for key in ("train", "trainable_params", "trainable_fraction", "steps", "tokens", "seconds", "tokens_per_second",
              "perplexity_before", "perplexity", "sparsity"):
    assert key in doc, key
  assert doc["train"] == "all" and doc["steps"] == STEPS and doc["tokens"] == STEPS * BATCH * SEQ
  assert doc["sparsity"] == 0.5 and doc["trainable_fraction"] == 1.0
  assert doc["perplexity"] < doc["perplexity_before"]
  assert "retrain all" in err and "tok_s" in err  # the progress bar, on stderr
  code, _, _ = run(capsys, "eval", "--model", tmp_path / "ck", "--data", files / "eval.npy", "--batch-size", BATCH,
                   "--json", tmp_path / "e.json")
  assert code == 0
  assert json.loads((tmp_path / "e.json").read_text())["perplexity"] == pytest.approx(doc["perplexity"], rel=1e-6)
  loaded = importlib.import_module("jaxprune.io").load_checkpoint(tmp_path / "ck", with_masks=True)
  assert loaded.masks is not None and loaded.metadata["retrain"]["train"] == "all"
  # A damaged train state (array data truncated, its metadata intact) is named in one line, and left in place.
  arrays = tmp_path / "ck.retrain-partial" / "state" / "arrays"
  damaged = [f for f in arrays.rglob("*") if f.is_file() and f.parent.name == "d" and f.stat().st_size > 100]
  assert damaged
  for f in damaged:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  _one_line_error(*run(capsys, *argv, "--overwrite")[::2], "train state is corrupt")
  assert arrays.exists()


def test_command_killed_mid_way_resumes_to_the_same_checkpoint(files, tmp_path, capsys, monkeypatch):
  """``jaxprune retrain`` killed after step 4, its train state saved at step 2: the same command resumes from step 2
  (saying so on stderr) and writes the checkpoint of an uninterrupted run, bit for bit."""
  from jaxprune.io import load_checkpoint

  code, _, err = run(capsys, *_args(files, tmp_path / "whole", "--train", "biases,norms"))
  assert code == 0, err
  argv = _args(files, tmp_path / "ck", "--train", "biases,norms", "--save-every", 2)

  class Killed(BaseException):
    pass

  save, calls = R._state.save_state, []

  def die_at_the_second_save(state_dir, state, progress):  # killed after step 4, its state unsaved
    calls.append(progress["step"])
    if len(calls) == 2:
      raise Killed
    save(state_dir, state, progress)

  with monkeypatch.context() as m:
    m.setattr(R._state, "save_state", die_at_the_second_save)
    with pytest.raises(Killed):
      run(capsys, *argv)
  assert R._state.read_progress(tmp_path / "ck.retrain-partial")["step"] == 2
  code, _, err = run(capsys, *argv)
  assert code == 0 and "resum" in err, err
  whole, resumed = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "ck")
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params), strict=True):
    np.testing.assert_array_equal(a, b)  # the same computation: the same bits


def _one_line_error(code, err, *needles):
  assert code == 2
  errors = [line for line in err.splitlines() if "error:" in line]
  assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
  for needle in needles:
    assert needle in errors[0], errors[0]


@pytest.mark.parametrize("extra, needles", [
    (("--train", "lora:0"), ("rank must be positive",)),
    (("--train", "masklora:-1"), ("rank must be positive",)),
    (("--train", "weights"), ("unknown trainable subset 'weights'",)),
    (("--train", "norms", "--lr", 0), ("--lr must be positive",)),
    (("--train", "norms", "--lr", -1e-3), ("--lr must be positive",)),
    (("--train", "norms", "--steps", 9), ("exceed the 1024", "--epochs")),
    (("--train", "norms", "--eval", "TRAIN"), ("same token file",)),
])
def test_command_bad_input(files, tmp_path, capsys, extra, needles):
  extra = tuple(files / "train.npy" if a == "TRAIN" else a for a in extra)
  _one_line_error(*run(capsys, *_args(files, tmp_path / "ck", *extra))[::2], *needles)
  assert not (tmp_path / "ck").exists()


def test_command_dense_model_and_masklora(files, tmp_path, capsys):
  argv = ("retrain", "--model", files / "dense", "--data", files / "train.npy", "--steps", 1, "--batch-size", BATCH,
          "--train", "masklora:4", "--out", tmp_path / "ck")
  _one_line_error(*run(capsys, *argv)[::2], "prune it first", "--mask-from-zeros")


def test_command_refuses_an_output_that_is_not_a_checkpoint(files, tmp_path, capsys):
  (tmp_path / "ck").mkdir()
  (tmp_path / "ck" / "notes.txt").write_text("mine")
  _one_line_error(*run(capsys, *_args(files, tmp_path / "ck", "--train", "norms"))[::2], "not a jaxprune checkpoint")
  assert (tmp_path / "ck" / "notes.txt").read_text() == "mine"


def test_command_corrupt_train_state(files, tmp_path, capsys, pruned):
  state = tmp_path / "ck.retrain-partial" / "state"
  state.mkdir(parents=True)
  (state / "progress.json").write_text("{not json")
  _one_line_error(*run(capsys, *_args(files, tmp_path / "ck", "--train", "norms"))[::2], "train state is corrupt")
  (state / "progress.json").write_text(json.dumps({"format": R._state.FORMAT, "step": 2}))
  _one_line_error(*run(capsys, *_args(files, tmp_path / "ck", "--train", "norms"))[::2], "different run")


# ------------------------------------------------------------------------------------ layer-wise reconstruction

def test_layerwise_reconstruction_lowers_every_blocks_error_and_keeps_the_zeros(windows):
  from jaxprune.prune import Unstructured
  from jaxprune.prune._sequential import PruneSpec, run_pass

  params = _random_params(LLAMA, 0)
  spec = PruneSpec("magnitude", Unstructured(0.5))  # reconstruction needs calibration inputs, also for magnitude
  recon = R.parse_reconstruction("norms,masklora:4", steps=20, lr=1e-2, batch_size=BATCH)
  calib, held_out = windows[:16], jnp.asarray(windows[-BATCH:])
  plain = run_pass(params, LLAMA, spec, calib, batch_size=BATCH, progress=False)
  fitted = run_pass(params, LLAMA, spec, calib, batch_size=BATCH, progress=False, refine=R.make_refiner(recon))
  for reports in fitted.reports:
    assert all(r["reconstruct_error_after"] < 0.9 * r["reconstruct_error_before"] for r in reports), reports
  for i, (block, masks) in enumerate(zip(fitted.params["layers"], fitted.masks)):
    for path, mask in masks.items():
      kernel = np.asarray(R._subsets.get_path(block, path)["kernel"])
      assert np.all(kernel[~mask] == 0.0) and np.all(kernel[mask] != 0.0), (i, path)
  for a, b in zip(fitted.masks, plain.masks):  # magnitude: the same masks; the reconstructed model is closer to dense
    assert all(np.array_equal(a[p], b[p]) for p in b)
  runner = Runner(LLAMA, batch_size=BATCH)

  def last_hidden(p):  # the residual stream leaving the last block, on windows the reconstruction did not see
    h = runner.embed(p, held_out)
    for block in p["layers"]:
      h = runner.block(block, h)
    return np.asarray(h, np.float64)

  dense, before, after = (last_hidden(p) for p in (params, plain.params, fitted.params))
  assert np.sum((after - dense) ** 2) < 0.9 * np.sum((before - dense) ** 2)


@pytest.mark.parametrize("text, needle", [("lora:4", "densify"), ("head", "outside the blocks"),
                                          ("norms,masklora:0", "rank")])
def test_reconstruction_refuses_what_cannot_fit_a_block(text, needle):
  with pytest.raises(JaxpruneError, match=needle) as e:
    R.parse_reconstruction(text)
  _one_line(e)


def test_prune_command_reconstructs_with_zero_biases_added(files, tmp_path, capsys):
  """``prune --reconstruct biases,norms`` on a LLaMA: zero linear biases are added (and saved with the config that
  says so), calibration windows are read also for magnitude, and every block reports its fitted error."""
  argv = ("prune", "--model", files / "dense", "--method", "magnitude", "--calib", files / "train.npy",
          "--nsamples", 16, "--seqlen", SEQ, "--batch-size", BATCH, "--out", tmp_path / "ck",
          "--json", tmp_path / "p.json")
  code, _, err = run(capsys, *argv, "--reconstruct", "biases,norms", "--reconstruct-steps", 3,
                     "--reconstruct-lr", 1e-2)
  assert code == 0, err
  layers = json.loads((tmp_path / "p.json").read_text())["layers"]
  assert all(r["reconstruct_error_after"] < r["reconstruct_error_before"] for r in layers)
  loaded = importlib.import_module("jaxprune.io").load_checkpoint(tmp_path / "ck", with_masks=True)
  assert loaded.config.qkv_bias and loaded.config.mlp_bias
  biases = [np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(loaded.params["layers"])
            if getattr(path[-1], "key", None) == "bias"]
  assert len(biases) == 2 * 7 and all(np.abs(b).max() > 0 for b in biases)  # added at zero, then fitted
  for text, needle in (("lora:4", "densify"), ("head", "outside the blocks")):
    _one_line_error(*run(capsys, *argv, "--overwrite", "--reconstruct", text)[::2], needle)
