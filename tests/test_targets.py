"""Choosing what to prune (``--targets``/``--ignore``), and solvers that are jitted with static options and work
inside a user's ``jax.jit``/``vmap``."""
from __future__ import annotations

import functools
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.cli import main
from jaxprune.models._config import ModelConfig
from jaxprune.prune._sequential import run_pass
from jaxprune.prune._targets import linear_names, select_linears

LLAMA = ModelConfig("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=4,
                    num_kv_heads=2, head_dim=4, max_position_embeddings=64, tie_word_embeddings=True)
OPT = LLAMA.replace(family="opt", num_kv_heads=4)
ATTN = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj")
MLP = ("mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
wired = pytest.mark.skipif("linears" not in inspect.signature(run_pass).parameters,
                           reason="the pass (prune/_sequential.py) does not take linears= yet")


@pytest.mark.parametrize("targets, ignore, expected", [
    (None, None, {(i, p) for i in range(3) for p in ATTN + MLP}),
    (["down_proj"], None, {(i, "mlp/down_proj") for i in range(3)}),
    (None, ["down_proj", "layers.0.*"], {(i, p) for i in (1, 2) for p in ATTN + MLP[:2]}),
    (["self_attn.[qk]_proj"], ["re:layers\\.(1|2)\\..*"], {(0, "self_attn/q_proj"), (0, "self_attn/k_proj")}),
    ("model.layers.2.mlp.*", None, {(2, p) for p in MLP}),  # the Hugging Face module name
    (["re:.*proj"], ["re:.*_proj"], None),  # nothing left
])
def test_select_linears(targets, ignore, expected):
  if expected is None:
    with pytest.raises(jp.JaxpruneError, match="leave no linear"):
      select_linears(LLAMA, targets, ignore)
  else:
    assert select_linears(LLAMA, targets, ignore) == expected


def test_select_linears_names_and_errors():
  opt = linear_names(OPT)
  assert opt[(1, "fc1")] == ("layers.1.fc1", "model.decoder.layers.1.fc1")
  assert select_linears(OPT, ["fc2"]) == {(i, "fc2") for i in range(3)}
  shallow = LLAMA.replace(sublayers=(("full", "full"), ("skip", "full"), ("full", "skip")))
  assert not any(k in select_linears(shallow) for k in [(1, "self_attn/q_proj"), (2, "mlp/up_proj")])
  for targets, ignore, needle in ((["down_prj"], None, "targets pattern 'down_prj' matches no linear"),
                                  (None, ["layers.9.*"], "ignore pattern 'layers.9.*' matches no linear"),
                                  (["re:("], None, "not a valid regular expression"),
                                  ([""], None, "non-empty string")):
    with pytest.raises(jp.JaxpruneError) as err:
      select_linears(LLAMA, targets, ignore)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def checkpoint(tmp_path):
  """A random two-block LLaMA as a jaxprune checkpoint, and calibration windows."""
  from jaxprune.io import save_checkpoint
  from jaxprune.models import _model as M

  config = LLAMA.replace(num_layers=2)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(1.0 if len(a.shape) == 1 else 0.0, 0.3, a.shape).astype(np.float32),
                        M.abstract_params(config))
  save_checkpoint(tmp_path / "dense", config, params)
  np.save(tmp_path / "calib.npy", np.random.default_rng(0).integers(0, 64, (4, 16)).astype(np.int32))
  return tmp_path / "dense"


def test_a_pattern_matching_nothing_fails_before_any_work(checkpoint, tmp_path, capsys):
  code = main(["prune", "--model", str(checkpoint), "--method", "magnitude", "--ignore", "downproj",
               "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert code == 2 and "ignore pattern 'downproj' matches no linear" in err and "Traceback" not in err
  assert not (tmp_path / "o").exists()


@wired
def test_ignored_linears_stay_dense_and_the_choice_is_recorded(checkpoint, tmp_path, capsys):
  code = main(["prune", "--model", str(checkpoint), "--method", "wanda", "--calib", str(tmp_path / "calib.npy"),
               "--nsamples", "4", "--seqlen", "16", "--ignore", "down_proj", "layers.0.*", "--out",
               str(tmp_path / "ck"), "--json", str(tmp_path / "p.json")])
  assert code == 0, capsys.readouterr().err
  model = jp.load_model(str(tmp_path / "ck"))
  assert model.metadata["targets"] == [] and model.metadata["ignore"] == ["down_proj", "layers.0.*"]
  layers = model.params["layers"]
  assert np.all(np.asarray(layers[0]["self_attn"]["q_proj"]["kernel"]) != 0)
  assert np.all(np.asarray(layers[1]["mlp"]["down_proj"]["kernel"]) != 0)
  assert np.mean(np.asarray(layers[1]["mlp"]["up_proj"]["kernel"]) == 0) == 0.5
  assert main(["export", "--model", str(tmp_path / "ck"), "--out", str(tmp_path / "out")]) == 0
  recipe = json.loads((tmp_path / "out" / "jaxprune_recipe.json").read_text())
  assert recipe["prune"]["ignore"] == ["down_proj", "layers.0.*"]


# ------------------------------------------------------------------------------------ solvers under jit


def _problem(d_out=24, d_in=32, seed=0):
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.standard_normal((d_out, d_in)), jnp.float32)
  stats = jp.accumulate(jp.init_stats(d_in), jnp.asarray(rng.standard_normal((96, d_in)), jnp.float32))
  return w, stats


def test_patterns_are_hashable_static_values_and_take_numpy_numbers():
  assert jp.NM(np.int64(2), np.int32(4)) == jp.NM(2, 4) and hash(jp.NM(np.int64(2), 4)) == hash(jp.NM(2, 4))
  assert jp.Unstructured(np.float32(0.5)) == jp.Unstructured(0.5)
  assert jax.tree.leaves([jp.NM(2, 4), jp.Unstructured(0.5)]) == []  # pytrees without leaves
  with pytest.raises(jp.JaxpruneError):
    jp.NM(np.float64(2.0), 4)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt", "admm"])
def test_solvers_are_compiled_once_per_shape_and_options(name):
  solver = getattr(jp, name)
  w, stats = _problem()
  before = solver._cache_size()
  first = solver(w, stats, pattern=jp.NM(2, 4))
  again = solver(w + 1, stats, pattern=jp.NM(np.int64(2), 4))
  assert solver._cache_size() == before + 1
  assert first.mask.shape == again.mask.shape == w.shape


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt", "admm"])
def test_solvers_inside_a_users_jit_and_vmap(name):
  solver = getattr(jp, name)
  pattern = jp.NM(2, 4)
  ws = jnp.stack([_problem(16, 16, seed=s)[0] for s in range(2)])
  _, stats = _problem(16, 16)
  batched = jax.jit(jax.vmap(lambda w: solver(w, stats, pattern=pattern)))(ws)
  for i in range(2):
    one = solver(ws[i], stats, pattern=pattern)
    np.testing.assert_allclose(batched.w[i], one.w, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(batched.mask[i], one.mask)


def test_a_pattern_may_pass_through_a_users_jit():
  w, stats = _problem()
  direct = jp.wanda(w, stats, pattern=jp.NM(2, 4))
  np.testing.assert_array_equal(jax.jit(jp.wanda)(w, stats, pattern=jp.NM(2, 4)).mask, direct.mask)
  fixed = jax.jit(functools.partial(jp.magnitude, pattern=jp.Unstructured(0.25), ties="threshold"))
  np.testing.assert_array_equal(fixed(w).mask, jp.magnitude(w, pattern=jp.Unstructured(0.25), ties="threshold").mask)
