"""Depth pruning on tiny random models: metrics against NumPy, removal equals a model built without the unit,
Shapley estimates against brute force over the same sub-networks, recovery against closed forms, trained recovery
against the closed-form optimum and no recovery, sharded equals unsharded, one compilation, checkpoint/HF round
trips, bad input (library and CLI)."""
import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import jitted
import tolerances as tol

from jaxprune import depth as D
from jaxprune.cli import main
from jaxprune.depth import _stages as S
from jaxprune.errors import JaxpruneError
from jaxprune.io._checkpoint import read_checkpoint, save_checkpoint
from jaxprune.models import _llama as llama, _model as M
from jaxprune.runner import Runner, _forward as F, data_mesh, make_mesh
from jaxprune.models._config import ModelConfig
from jaxprune.models._layers import RMSNorm

CONFIG = ModelConfig(family="llama", vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=3, num_heads=4,
                     num_kv_heads=2, head_dim=6, max_position_embeddings=32, tie_word_embeddings=False,
                     norm_eps=1e-5)
TOL = 1e-5


def _random_norms(params, key):
  """Norm scales away from 1, so that a wrong norm placement shows."""
  def f(path, x):
    return x + 0.3 * jax.random.normal(key, x.shape) if path[-1].key == "scale" else x
  return jax.tree.map(np.asarray, jax.tree_util.tree_map_with_path(f, params))


@pytest.fixture(scope="module")
def params():
  return _random_norms(M.init_params(CONFIG, jax.random.key(0)), jax.random.key(1))


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(0).integers(0, 61, size=(5, 9)).astype(np.int32)  # 5: padded batches


def _loss(params, config, tokens):
  return float(np.mean(np.asarray(Runner(config).window_losses(params, jnp.asarray(tokens)), np.float64)))


def _streams(params, tokens):
  """Per layer ``(h_in, h_mid, h_out)`` from the model's own modules: attention alone, then the full block (one
  jitted program)."""
  @jax.jit
  def run(params, tokens):
    ctx = M.context(CONFIG, *tokens.shape)
    h = M.embed(params, tokens, config=CONFIG)
    out = []
    for bp in params["layers"]:
      x = RMSNorm(CONFIG.norm_eps).apply({"params": bp["input_layernorm"]}, h)
      mid = h + llama.Attention(CONFIG).apply({"params": bp["self_attn"]}, x, ctx)
      nxt = M.block(bp, h, ctx, config=CONFIG)
      out.append((h, mid, nxt))
      h = nxt
    return out

  return [tuple(np.asarray(a, np.float64) for a in layer) for layer in run(params, jnp.asarray(tokens))]


@pytest.fixture(scope="module")
def streams(params, tokens):
  return _streams(params, tokens)


def _cos(a, b):
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_similarities_match_numpy(params, tokens, streams):
  got = D.similarities(params, tokens, config=CONFIG, batch_size=2)
  for i, (h, mid, out) in enumerate(streams):
    for unit, (a, b) in {"block": (h, out), "attention": (h, mid), "mlp": (mid, out)}.items():
      cos = _cos(a, b)
      np.testing.assert_allclose(got[unit][0][i], cos.mean(), atol=TOL, err_msg=f"{unit} {i}")
      np.testing.assert_allclose(got[unit][1][i], (np.arccos(np.clip(cos, -1, 1)) / np.pi).mean(), atol=TOL)
  s = D.score(params, tokens, config=CONFIG, metric="cosine", unit="mlp", batch_size=2)
  np.testing.assert_allclose(s.scores, 1 - got["mlp"][0], atol=1e-12)
  assert s.order() == sorted(range(3), key=lambda i: s.scores[i])


def _without(params, unit, layers, recovery=D.Recovery()):
  return D.replace_units(params, CONFIG, unit=unit, adapters={i: {} for i in layers}, recovery=recovery)


@pytest.mark.parametrize("unit", D.UNITS)
def test_leave_one_out_equals_models_built_without_the_unit(params, tokens, unit):
  got = D.leave_one_out(params, tokens, config=CONFIG, unit=unit, batch_size=2)
  base = _loss(params, CONFIG, tokens)
  for i in range(3):
    p, c = _without(params, unit, [i])
    assert jax.tree.structure(p) == jax.tree.structure(M.abstract_params(c))
    assert c.num_layers == (2 if unit == "block" else 3)
    np.testing.assert_allclose(got[i], _loss(p, c, tokens) - base, atol=TOL, err_msg=f"{unit} {i}")


@pytest.mark.parametrize("unit", D.UNITS)
def test_skipped_stage_equals_forward_of_smaller_model(params, tokens, unit):
  chain = S.Chain(params, CONFIG, tokens, batch_size=5, mesh=None)
  present = [True] * 6
  for s in S.unit_stages(unit, 1):
    present[s] = False
  toks, _ = next(iter(chain))
  h = chain.streams(chain.embed(toks), present)[-1]
  p, c = _without(params, unit, [1])
  ref = jitted.forward(p, tokens, config=c)
  np.testing.assert_allclose(M.head(params, h, config=CONFIG), ref, atol=1e-4)


def test_shapley_matches_exact_enumeration(params, tokens):
  loss = {}
  for r in range(4):
    for subset in itertools.combinations(range(3), r):
      p, c = _without(params, "block", [i for i in range(3) if i not in subset])
      loss[subset] = _loss(p, c, tokens)
  exact = np.zeros(3)
  for j in range(3):
    for r in range(3):
      for s in itertools.combinations([i for i in range(3) if i != j], r):
        weight = math.factorial(r) * math.factorial(2 - r) / 6
        exact[j] += weight * (loss[s] - loss[tuple(sorted(s + (j,)))])
  phi, se = D.shapley(params, tokens, config=CONFIG, unit="block", samples=40, seed=3, batch_size=2)
  np.testing.assert_allclose(phi.sum(), loss[()] - loss[(0, 1, 2)], atol=TOL)  # efficiency, every sample
  assert np.all(se > 0) and np.all(np.abs(phi - exact) <= 4 * se + TOL), (phi, exact, se)


def test_bias_recovery_is_the_mean_update(params, tokens, streams):
  adapters, errors = D.fit_adapters(params, CONFIG, tokens, unit="mlp", layers=[1], recovery=D.Recovery("bias"),
                                    batch_size=2)
  y = (streams[1][2] - streams[1][1]).reshape(-1, 24)
  np.testing.assert_allclose(adapters[1]["bias"], y.mean(0), atol=TOL)
  np.testing.assert_allclose(errors[1], np.sum((y - y.mean(0)) ** 2) / np.sum(y ** 2), rtol=1e-4)
  adapters, _ = D.fit_adapters(params, CONFIG, tokens, unit="block", layers=[0, 2], recovery=D.Recovery("bias"),
                               batch_size=2)
  np.testing.assert_allclose(adapters[0]["bias"], (streams[0][2] - streams[0][0]).mean((0, 1)), atol=TOL)
  # Layer 2's adapter is fitted on the stream of the model whose block 0 is already replaced.
  p, c = D.replace_units(params, CONFIG, unit="block", adapters={0: adapters[0]}, recovery=D.Recovery("bias"))
  ctx = M.context(c, *tokens.shape)
  h = M.embed(p, jnp.asarray(tokens), config=c)
  for i in range(2):
    h = M.block(p["layers"][i], h, ctx, config=c, modes=c.sublayer_modes(i))
  update = M.block(p["layers"][2], h, ctx, config=c) - h
  np.testing.assert_allclose(adapters[2]["bias"], np.asarray(update, np.float64).mean((0, 1)), atol=TOL)


def _reduced_rank_optimum(x, y, rank, lam):
  """min over rank-``rank`` W and b of ‖Y - XW - b‖² + λ‖W‖², in float64 (Eckart-Young on the ridge fit)."""
  xc, yc = x - x.mean(0), y - y.mean(0)
  xa = np.concatenate([xc, np.sqrt(lam) * np.eye(x.shape[1])])
  ya = np.concatenate([yc, np.zeros((x.shape[1], y.shape[1]))])
  fitted = xa @ np.linalg.lstsq(xa, ya, rcond=None)[0]
  sv = np.linalg.svd(fitted, compute_uv=False)
  return np.sum((ya - fitted) ** 2) + np.sum(sv[rank:] ** 2)


@pytest.mark.parametrize("damp", [0.0, 0.05])
@pytest.mark.parametrize("rank", [1, 3, 12])
def test_lowrank_fit_reaches_the_eckart_young_optimum(rank, damp):
  rng = np.random.default_rng(rank)
  x = rng.normal(size=(1, 300, 12)) * rng.uniform(0.5, 2.0, 12) + 3.0
  y = x @ rng.normal(size=(12, 12)) + 0.3 * rng.normal(size=(1, 300, 12)) - 1.0
  m = D.moments([jnp.asarray(x, jnp.float32)], [jnp.asarray(y, jnp.float32)], [jnp.ones((1,), jnp.float32)])
  a = D.fit(m, D.Recovery("lowrank", rank, damp))
  assert a["down"].shape == (12, rank) and a["up"].shape == (rank, 12)
  w = np.asarray(a["down"], np.float64) @ np.asarray(a["up"], np.float64)
  x2, y2 = x[0], y[0]
  lam = damp * np.mean(np.var(x2, axis=0) * len(x2))
  err = np.sum((y2 - x2 @ w - np.asarray(a["bias"], np.float64)) ** 2)
  np.testing.assert_allclose(err + lam * np.sum(w ** 2), _reduced_rank_optimum(x2, y2, rank, lam), rtol=1e-4)
  np.testing.assert_allclose(float(D.residual(m, a)), err, rtol=1e-4)
  if damp == 0.0:  # a larger rank never fits worse; the bias alone is the rank-0 case
    assert err <= float(D.residual(m, D.fit_bias(m))) + 1e-6


def test_sharded_equals_unsharded(params, tokens):
  mesh = data_mesh()
  assert mesh.shape["data"] == 8
  for kw in ({"metric": "cosine"}, {"metric": "loss"}, {"metric": "shapley", "samples": 2}):
    for unit in ("block", "attention"):
      a = D.score(params, tokens, config=CONFIG, unit=unit, batch_size=2, **kw)
      b = D.score(params, tokens, config=CONFIG, unit=unit, batch_size=2, mesh=mesh, **kw)
      tol.assert_reordered(b.scores, a.scores, f"{unit} {kw}")
  rec = D.Recovery("lowrank", 4, 1e-2)
  a, ea = D.fit_adapters(params, CONFIG, tokens, unit="attention", layers=[0, 2], recovery=rec, batch_size=2)
  b, eb = D.fit_adapters(params, CONFIG, tokens, unit="attention", layers=[0, 2], recovery=rec, mesh=mesh)
  for i in (0, 2):
    tol.assert_within(b[i]["down"] @ b[i]["up"], a[i]["down"] @ a[i]["up"],
                      tol.PASS_REORDERED * np.abs(a[i]["down"] @ a[i]["up"]).max(), f"low-rank map {i}")
    tol.assert_reordered(eb[i], ea[i], f"recovery error {i}")


def test_model_axis_equals_unsharded(params, tokens):
  """On a ``(data, model)`` mesh of 4 × 2 (parameters sharded over ``model``) the metrics and the low-rank recovery
  are those of one device."""
  mesh = make_mesh(model=2)
  for kw in ({"metric": "cosine"}, {"metric": "loss"}):
    a = D.score(params, tokens, config=CONFIG, unit="block", batch_size=2, **kw)
    b = D.score(params, tokens, config=CONFIG, unit="block", batch_size=2, mesh=mesh, **kw)
    tol.assert_reordered(b.scores, a.scores, f"block {kw}")
  rec = D.Recovery("lowrank", 4, 1e-2)
  a, ea = D.fit_adapters(params, CONFIG, tokens, unit="mlp", layers=[1], recovery=rec, batch_size=2)
  b, eb = D.fit_adapters(params, CONFIG, tokens, unit="mlp", layers=[1], recovery=rec, mesh=mesh)
  tol.assert_within(b[1]["down"] @ b[1]["up"], a[1]["down"] @ a[1]["up"],
                    tol.PASS_REORDERED * np.abs(a[1]["down"] @ a[1]["up"]).max(), "low-rank map")
  tol.assert_reordered(eb[1], ea[1], "recovery error")


def test_one_compilation_per_half_block_shape(params, tokens):
  config = CONFIG.replace(hidden_size=36, num_heads=6)  # a shape no other test compiles
  p = M.init_params(config, jax.random.key(2))
  F.block.clear_cache()
  D.similarities(p, tokens, config=config, batch_size=5)
  assert F.block._cache_size() == 2  # 3 layers: one attention half, one MLP half
  p2, c2 = D.remove_blocks(p, config, [1])
  p2, c2 = D.replace_units(p2, c2, unit="attention", adapters={0: {}}, recovery=D.Recovery())
  D.leave_one_out(p2, tokens, config=c2, unit="mlp", batch_size=5)
  assert F.block._cache_size() == 2  # removals elsewhere do not recompile


def test_pipeline_checkpoint_round_trip(params, tokens, tmp_path):
  r = D.depth_prune(params, tokens, config=CONFIG, metric="angular", unit="attention", remove=2,
                    recovery=D.parse_recovery("lowrank:3", width=24), batch_size=2)
  assert [m[0] for m in r.config.sublayers].count("lowrank") == 2 and r.config.adapter_rank == 3
  assert set(r.fit_error) == set(r.removed) and all(0 <= e <= 1 for e in r.fit_error.values())
  r2 = D.depth_prune(r.params, tokens, config=r.config, metric="loss", unit="block", remove=1, iterative=True,
                     batch_size=2)
  assert r2.config.num_layers == 2 and r2.params_after < r2.params_before
  save_checkpoint(tmp_path / "ck", r2.config, r2.params, metadata={"depth": r2.to_json()})
  config, loaded, _, meta = read_checkpoint(tmp_path / "ck")
  assert config == r2.config and meta["depth"]["removed"] == r2.to_json()["removed"]
  ids = jnp.asarray(tokens)
  np.testing.assert_allclose(jitted.forward(loaded, ids, config=config), jitted.forward(r2.params, ids, config=config),
                             atol=1e-6)


def test_iterative_reports_original_layers(params, tokens):
  r = D.depth_prune(params, tokens, config=CONFIG, metric="cosine", unit="block", remove=2, iterative=True,
                    batch_size=5)
  assert len(r.steps) == 2 and r.steps[1].layers == tuple(i for i in range(3) if i != r.removed[0])
  assert r.config.num_layers == 1 and len(set(r.removed)) == 2
  one = D.depth_prune(params, tokens, config=CONFIG, metric="cosine", unit="block", remove=2, batch_size=5)
  assert one.removed == one.steps[0].order()[:2]


def _hf_model(**extra):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from jaxprune.models._config import from_hf_config
  from jaxprune.models._convert import params_from_hf

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                 rms_norm_eps=1e-5, tie_word_embeddings=False, **extra)
  model = transformers.LlamaForCausalLM(cfg).eval()
  config = from_hf_config(model.config.to_dict())
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return config, params_from_hf(state.__getitem__, set(state), config)


def _hf_logits(path, tokens):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = transformers.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy(), model.config


def test_export_of_pruned_models_loads_in_transformers(tokens, tmp_path):
  from jaxprune.io._hf import save_hf_dir

  config, params = _hf_model()
  p, c = D.remove_blocks(params, config, [1])
  save_hf_dir(tmp_path / "blocks", *D.hf_compatible(c, p))
  logits, hf_config = _hf_logits(tmp_path / "blocks", tokens)
  assert hf_config.num_hidden_layers == 2
  np.testing.assert_allclose(logits, jitted.forward(p, tokens, config=c), atol=1e-4)
  rng = np.random.default_rng(0)
  bias = D.Recovery("bias")
  p, c = D.replace_units(params, config, unit="attention", adapters={0: {}}, recovery=D.Recovery())
  p, c = D.replace_units(p, c, unit="mlp", adapters={2: {"bias": rng.normal(size=24).astype(np.float32)}},
                         recovery=bias)
  p, c = D.replace_units(p, c, unit="block", adapters={1: {"bias": rng.normal(size=24).astype(np.float32)}},
                         recovery=bias)
  save_hf_dir(tmp_path / "subs", *D.hf_compatible(c, p))
  logits, hf_config = _hf_logits(tmp_path / "subs", tokens)
  assert hf_config.attention_bias and hf_config.mlp_bias and hf_config.num_hidden_layers == 3
  np.testing.assert_allclose(logits, jitted.forward(p, tokens, config=c), atol=1e-4)
  p, c = D.replace_units(params, config, unit="mlp", adapters={0: {"bias": np.zeros(24, np.float32),
                         "down": np.zeros((24, 2), np.float32), "up": np.zeros((2, 24), np.float32)}},
                         recovery=D.Recovery("lowrank", 2))
  with pytest.raises(JaxpruneError, match="lowrank adapters cannot be expressed"):
    D.hf_compatible(c, p)


def _one_line(err):
  assert "\n" not in str(err.value) and str(err.value)


def test_bad_input_gives_one_line_errors(params, tokens):
  with pytest.raises(JaxpruneError, match="only 3") as err:
    D.removal_count(CONFIG, "block", remove=4)
  _one_line(err)
  with pytest.raises(JaxpruneError, match="unknown metric") as err:
    D.score(params, tokens, config=CONFIG, metric="taylor", unit="block")
  _one_line(err)
  with pytest.raises(JaxpruneError, match="larger than the model width 24") as err:
    D.parse_recovery("lowrank:25", width=24)
  _one_line(err)
  with pytest.raises(JaxpruneError, match="larger than the model width 24"):
    D.depth_prune(params, tokens, config=CONFIG, metric="cosine", unit="mlp", remove=1,
                  recovery=D.Recovery("lowrank", 99))
  for bad in ("lowrank", "lowrank:0", "lowrank:x", "bias:3", "svd"):
    with pytest.raises(JaxpruneError) as err:
      D.parse_recovery(bad)
    _one_line(err)
  with pytest.raises(JaxpruneError, match="unknown unit"):
    D.score(params, tokens, config=CONFIG, metric="cosine", unit="head")
  with pytest.raises(JaxpruneError, match="fraction"):
    D.removal_count(CONFIG, "mlp", fraction=1.5)
  assert D.removal_count(CONFIG, "mlp", fraction=0.5) == 2


def test_cli_end_to_end_and_errors(params, tmp_path, capsys):
  rng = np.random.default_rng(1)
  np.save(tmp_path / "calib.npy", rng.integers(0, 61, size=(4, 16)).astype(np.int32))
  np.save(tmp_path / "eval.npy", rng.integers(0, 61, size=(3, 16)).astype(np.int32))
  save_checkpoint(tmp_path / "dense", CONFIG, params)
  common = ["--calib", tmp_path / "calib.npy", "--nsamples", 4, "--seqlen", 16, "--batch-size", 2]
  argv = ["depth", "--model", tmp_path / "dense", "--metric", "angular", "--unit", "attention", "--remove", 1,
          "--recover", "bias", *common, "--out", tmp_path / "a", "--eval", tmp_path / "eval.npy",
          "--json", tmp_path / "a.json"]
  assert main([str(a) for a in argv]) == 0
  res = json.loads((tmp_path / "a.json").read_text())
  assert len(res["ranking"]) == 3 and res["removed"] == [res["ranking"][0]["unit"]]
  assert res["params_after"] < res["params_before"] and res["perplexity"] > 1 and res["eval"]["tokens"] == 48
  config, _, _, meta = read_checkpoint(tmp_path / "a")
  assert [m[0] for m in config.sublayers].count("bias") == 1 and meta["depth"][0]["recover"] == "bias"
  argv = ["depth", "--model", tmp_path / "a", "--unit", "block", "--fraction", 0.34, *common, "--out",
          tmp_path / "b"]
  assert main([str(a) for a in argv]) == 0
  config, _, _, meta = read_checkpoint(tmp_path / "b")
  assert config.num_layers == 2 and len(meta["depth"]) == 2
  assert main(["export", "--model", str(tmp_path / "b"), "--out", str(tmp_path / "hf")]) == 0
  capsys.readouterr()
  for extra, needle in ((["--metric", "taylor", "--remove", 1], "unknown metric"),
                        (["--remove", 4], "only 3"), (["--remove", 1, "--recover", "lowrank:25"], "width 24")):
    code = main([str(a) for a in ["depth", "--model", tmp_path / "dense", *extra, *common, "--out",
                                  tmp_path / "c"]])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


# --- near-full Shapley, last-token angular distance, learned recovery -------------------------------------------


def test_angular_last_matches_numpy(params, tokens, streams):
  got = D.similarities(params, tokens, config=CONFIG, batch_size=2)
  for i, (h, mid, out) in enumerate(streams):
    for unit, (a, b) in {"block": (h, out), "attention": (h, mid), "mlp": (mid, out)}.items():
      last = np.arccos(np.clip(_cos(a, b)[:, -1], -1, 1)) / np.pi  # (windows,): the last position only
      np.testing.assert_allclose(got[unit].angular_last[i], last.mean(), atol=TOL, err_msg=f"{unit} {i}")
  s = D.score(params, tokens, config=CONFIG, metric="angular_last", unit="attention", batch_size=2)
  np.testing.assert_allclose(s.scores, got["attention"].angular_last, atol=1e-12)


def test_near_full_coalitions_remove_k_units_uniformly():
  rows = D.coalitions(7, 3, 4, seed=5)
  assert rows.shape == (4 * 3, 7) and np.all((~rows).sum(1) == 3)
  absent = (~rows).reshape(4, 3, 7).sum(1)
  assert np.all(absent >= 1)  # every unit left out at least once per round (the filled-up group may repeat one)
  assert np.all((~rows).reshape(4, 3, 7)[:, :2].sum(1) <= 1)  # the full groups partition a permutation
  rows = D.coalitions(5, 2, 3000, seed=0)  # 3 groups per round, the last filled up: still uniform over C(5, 2)
  _, counts = np.unique(rows, axis=0, return_counts=True)
  assert len(counts) == 10 and np.all(np.abs(counts / 900 - 1) < 0.1), counts  # 9000 draws: ±3.3 % is one sd
  assert D.near_count(30) == 3 and D.near_count(3) == 1 and D.near_count(10) == 1  # n - floor(0.9 n)
  for n, near in ((1, None), (4, 0), (4, 4)):
    with pytest.raises(JaxpruneError, match="shapley_near") as err:
      D.near_count(n, near)
    _one_line(err)
  with pytest.raises(JaxpruneError, match="at least 2 candidate units, the model has 1"):  # before any work
    D.depth_prune({"layers": []}, np.zeros((1, 2)), config=CONFIG, metric="shapley_near", unit="block", remove=3,
                  iterative=True)


def _model_loss(params, config, tokens):
  """``_loss`` block by block, the head given only its own params, so that models of other depths and structure
  edits reuse every compilation."""
  runner = Runner(config)
  ids = jnp.asarray(tokens)
  h = runner.embed(params, ids)
  for block, modes in zip(params["layers"], runner.layer_modes):
    h = runner.block(block, h, modes=modes)
  head = {k: v for k, v in params.items() if k != "layers"}
  return float(np.mean(np.asarray(runner.head_losses(head, h, ids), np.float64)))


def test_shapley_near_matches_brute_force_over_the_same_coalitions(tokens):
  config = CONFIG.replace(num_layers=7)  # same block shapes: no new compilation
  params7 = _random_norms(M.init_params(config, jax.random.key(4)), jax.random.key(5))
  # 7 units, 3 removed: groups of 3, 3 and 1 + 2 filled up, so some units are left out twice in a round.
  phi, se = D.shapley_near(params7, tokens, config=config, unit="attention", samples=2, near=3, seed=2, batch_size=2)
  rows = D.coalitions(7, 3, 2, seed=2)
  loss = {}
  for row in map(tuple, rows):  # every sub-network built as a model and run whole
    if row not in loss:
      p, c = D.replace_units(params7, config, unit="attention", adapters={i: {} for i in range(7) if not row[i]},
                             recovery=D.Recovery())
      loss[row] = _model_loss(p, c, tokens)
  losses = np.array([loss[tuple(r)] for r in rows], np.float64)
  assert np.any((~rows).reshape(2, 3, 7).sum(1) == 2)  # the seed exercises the filled-up group
  for u in range(7):
    out, inn = losses[~rows[:, u]], losses[rows[:, u]]
    np.testing.assert_allclose(phi[u], out.mean() - inn.mean(), atol=TOL, err_msg=f"unit {u}")
    ref = math.sqrt(np.var(out, ddof=1) / len(out) + np.var(inn, ddof=1) / len(inn))
    np.testing.assert_allclose(se[u], ref, rtol=1e-3, atol=TOL, err_msg=f"unit {u}")
  s = D.score(params7, tokens, config=config, metric="shapley_near", unit="attention", samples=2, seed=2, near=3,
              batch_size=2)
  np.testing.assert_allclose(s.scores, phi, atol=1e-12)
  assert s.near == 3 and s.to_json()["near"] == 3 and s.to_json()["samples"] == 2


@pytest.mark.parametrize("kind", ["bias", "lowrank:3"])
def test_learned_mse_recovery_approaches_the_closed_form_optimum(params, tokens, kind):
  """Trained on the unit's update, the adapter explains most of what the least-squares optimum explains, and never
  more: the closed forms (damp 0) are that optimum."""
  _, best = D.fit_adapters(params, CONFIG, tokens, unit="mlp", layers=[1], recovery=D.parse_recovery(kind, damp=0.0),
                           batch_size=2)
  rec = D.parse_recovery(kind, fit="mse", steps=150, lr=0.05)
  adapters, learned = D.fit_adapters(params, CONFIG, tokens, unit="mlp", layers=[1], recovery=rec, batch_size=2)
  assert set(adapters[1]) == ({"bias"} if kind == "bias" else {"bias", "down", "up"})
  assert best[1] * (1 - 1e-4) <= learned[1] <= best[1] + 0.1 * (1 - best[1]), (learned, best)  # skip: 1


def test_learned_lm_recovery_lowers_the_calibration_loss_and_trains_only_adapters(params, tokens, tmp_path):
  rec = D.parse_recovery("bias", fit="lm", steps=30, lr=0.05)
  r = D.depth_prune(params, tokens, config=CONFIG, metric="cosine", unit="mlp", remove=2, recovery=rec, batch_size=2)
  assert r.to_json()["recover_fit"] == "lm" and r.to_json()["recover_steps"] == 30
  none = _without(params, "mlp", r.removed)  # the same units skipped: no recovery
  assert _model_loss(*none, tokens) - _model_loss(r.params, r.config, tokens) > 0.05  # measured 0.54
  for i, block in enumerate(r.params["layers"]):  # the model's own weights are the input's, bit for bit
    kept = {k: v for k, v in block.items() if k != "mlp_adapter"}
    assert jax.tree.structure(kept) == jax.tree.structure(none[0]["layers"][i])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(none[0]["layers"][i])))
    assert ("mlp_adapter" in block) == (i in r.removed)
  for key in ("embed", "head", "norm"):
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(r.params.get(key)),
                                                     jax.tree.leaves(params.get(key))))
  save_checkpoint(tmp_path / "ck", r.config, r.params, metadata={"depth": r.to_json()})  # as closed-form adapters
  config, loaded, _, meta = read_checkpoint(tmp_path / "ck")
  assert config == r.config and meta["depth"]["recover_fit"] == "lm"
  assert jax.tree.structure(loaded) == jax.tree.structure(r.params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(r.params)))
  c, p = D.hf_compatible(r.config, r.params)  # exported as any bias adapter: the down projection's bias
  for i in r.removed:
    bias = r.params["layers"][i]["mlp_adapter"]["bias"]
    np.testing.assert_array_equal(p["layers"][i]["mlp"]["down_proj"]["bias"], bias)


def test_bad_recovery_fits_give_one_line_errors():
  for kw, needle in ((dict(fit="sgd"), "unknown recovery fit"), (dict(init="random"), "unknown recovery init"),
                     (dict(steps=0), "steps"), (dict(lr=0.0), "learning rate")):
    with pytest.raises(JaxpruneError, match=needle) as err:
      D.parse_recovery("bias", **kw)
    _one_line(err)
  with pytest.raises(JaxpruneError, match="not none") as err:
    D.parse_recovery("none", fit="mse")
  _one_line(err)


def test_cli_learned_recovery_and_near_shapley(params, tmp_path, capsys):
  from test_cli import assert_one_line_error, run

  rng = np.random.default_rng(1)
  np.save(tmp_path / "calib.npy", rng.integers(0, 61, size=(4, 16)).astype(np.int32))
  save_checkpoint(tmp_path / "dense", CONFIG, params)
  common = ["--model", tmp_path / "dense", "--calib", tmp_path / "calib.npy", "--nsamples", 4, "--seqlen", 16,
            "--batch-size", 2]
  code, _, err = run(capsys, "depth", *common, "--metric", "shapley_near", "--samples", 2, "--unit", "attention",
                     "--remove", 1, "--recover", "lowrank:2", "--recover-fit", "mse", "--recover-steps", 5,
                     "--recover-lr", 0.01, "--out", tmp_path / "a", "--json", tmp_path / "a.json")
  assert code == 0, err
  res = json.loads((tmp_path / "a.json").read_text())
  assert res["metric"] == "shapley_near" and res["near"] == 1 and res["samples"] == 2
  assert all("stderr" in row for row in res["ranking"]) and res["removed"] == [res["ranking"][0]["unit"]]
  assert (res["recover"], res["recover_fit"], res["recover_steps"], res["recover_lr"]) == ("lowrank:2", "mse", 5, 0.01)
  assert read_checkpoint(tmp_path / "a")[0].adapter_rank == 2
  for extra, needle in ((["--recover", "bias", "--recover-fit", "sgd"], "unknown recovery fit"),
                        (["--recover", "bias", "--recover-init", "random"], "unknown recovery init"),
                        (["--recover", "bias", "--recover-fit", "mse", "--recover-steps", 0], "steps"),
                        (["--recover", "bias", "--recover-fit", "lm", "--recover-lr", -1], "learning rate"),
                        (["--recover-fit", "lm"], "not none"),
                        (["--metric", "shapley_near", "--near", 0], "--near"),
                        (["--metric", "shapley_near", "--near", 3], "between 1 and 2")):
    code, _, err = run(capsys, "depth", *common, "--remove", 1, *extra, "--out", tmp_path / "c")
    assert_one_line_error(code, err, needle)
