"""The runner: window-by-window batching equals whole batches, loss and gradients against a float64 reference,
trainable subsets, 8 devices against one, one compilation per shape, and that nothing else jits a forward."""
import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import jitted
import tolerances as tol

from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig
from jaxprune.models._convert import params_to_hf
from jaxprune.models._layers import MID
from jaxprune._tree import get as tree_get
from jaxprune.runner import Runner, _forward as F, make_mesh
from jaxprune.runner._batches import fetched_ahead, gathered

LLAMA = ModelConfig(family="llama", vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=6, max_position_embeddings=32, tie_word_embeddings=False, norm_eps=1e-5)
OPT = ModelConfig(family="opt", vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4,
                  num_kv_heads=4, head_dim=6, max_position_embeddings=32, tie_word_embeddings=True, norm_eps=1e-5,
                  qkv_bias=True, o_bias=True, mlp_bias=True, activation="relu")


# OPT's forward and gradients are held to PyTorch's in test_loss_and_grad_match_pytorch; the runner's batching,
# sharding and subsets are family-blind, so their OPT variants run with the slow tests.
@pytest.fixture(scope="module", params=[LLAMA, pytest.param(OPT, marks=pytest.mark.slow)], ids=["llama", "opt"])
def model(request):
  config = request.param
  return config, M.init_params(config, jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, 61, size=(3, 17)), jnp.int32)


def _all_pieces(runner, params, tokens):
  block = params["layers"][0]
  h = runner.embed(params, tokens)
  names = tuple(M.tap_order(runner.static))
  taps = runner.taps(block, h, names=names)
  given = {MID: taps[MID], "down_in": taps["down_in"]}
  return [h, runner.block(block, h), *taps.values(), runner.block(block, h, given=given),
          runner.taps(block, h, names=("o_in",), given={"attn_in": taps["attn_in"]})["o_in"],
          runner.window_losses(params, tokens)]


def test_window_by_window_equals_whole_batch(model, tokens):
  config, params = model
  whole = _all_pieces(Runner(config, windowed=False), params, tokens)
  one_by_one = _all_pieces(Runner(config, windowed=True), params, tokens)
  for i, (a, b) in enumerate(zip(whole, one_by_one, strict=True)):
    tol.assert_reordered(b, a, f"piece {i}")


def test_windowed_block_really_loops(model, tokens):
  config, params = model
  h = jnp.zeros((3, 17, config.hidden_size), jnp.float32)
  runner = Runner(config, windowed=True)
  text = F.block.lower(params["layers"][0], h, runner.context(3, 17), None, config=runner.static,
                       modes=("full", "full"), windowed=True).as_text()
  assert "while" in text


@pytest.mark.parametrize("windowed", [True, False])
def test_tap_sums_are_the_weighted_squares_of_the_taps(model, tokens, windowed):
  """The squared norms summed inside the block's program (Wanda's statistics) against a float64 sum of the taps
  :meth:`Runner.taps` returns, a padding window (weight 0) left out, added to the sums given; the taps kept
  are the taps; with inputs ``given`` as the true-sequential order passes them."""
  config, params = model
  runner = Runner(config, windowed=windowed)
  block = params["layers"][0]
  h = runner.embed(params, tokens)
  weights = jnp.asarray([1.0, 1.0, 0.0], jnp.float32)
  names = tuple(M.tap_order(runner.static))
  taps = runner.taps(block, h, names=names)
  for given, summed, keep in ((None, ("attn_in", "down_in"), ("o_in",)),
                              ({"o_in": taps["o_in"]}, ("mlp_in",), ("mlp_in", MID))):
    start = {name: jnp.full((taps[name].shape[-1],), 2.0, jnp.float32) for name in summed}
    want = {name: 2.0 + np.einsum("btd,b->d", np.asarray(taps[name], np.float64) ** 2, np.asarray(weights, np.float64))
            for name in summed}
    sums, kept = runner.tap_sums(block, h, weights, dict(start), names=summed, keep=keep, given=given)
    assert set(sums) == set(summed) and set(kept) == set(keep)
    for name in summed:
      tol.assert_reordered(sums[name], want[name], name)
    for name in keep:
      tol.assert_reordered(kept[name], taps[name], name)


@pytest.mark.parametrize("windowed", [True, False])
def test_tap_sums_of_a_bfloat16_block_are_those_of_its_taps_as_held(tokens, windowed):
  """In a bfloat16 block the squared norms are those of the taps rounded to bfloat16, as :meth:`Runner.taps`
  writes them out (and as the reference implementations read a half-precision linear's input). At these widths XLA
  squares the MLP's hidden layer from the float32 values it rounds to bfloat16 unless told not to: their sums
  differed from the taps' by 2.8e-3 of the largest (measured), against the 1e-5 asserted."""
  config = LLAMA.replace(hidden_size=256, intermediate_size=688, head_dim=64, num_layers=1)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), M.init_params(config, jax.random.key(0)))
  runner = Runner(config, windowed=windowed)
  block = params["layers"][0]
  h = runner.embed(params, tokens)
  names = ("attn_in", "o_in", "mlp_in", "down_in")
  taps = runner.taps(block, h, names=names)
  zeros = {name: jnp.zeros((taps[name].shape[-1],), jnp.float32) for name in names}
  sums, _ = runner.tap_sums(block, h, jnp.ones((tokens.shape[0],), jnp.float32), zeros, names=names)
  for name in names:
    assert taps[name].dtype == jnp.bfloat16
    tol.assert_reordered(sums[name], (np.asarray(taps[name], np.float64) ** 2).sum((0, 1)), name)


def _f64_window_losses(params, config, tokens):
  """The protocol's per-window loss in float64 NumPy from the model's logits."""
  logits = np.asarray(jitted.forward(params, tokens, config=config), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp[:, :-1], np.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]
  return nll.mean(axis=1)


def test_window_losses_are_the_cross_entropy(model, tokens):
  config, params = model
  got = Runner(config).window_losses(params, tokens)
  np.testing.assert_allclose(np.asarray(got), _f64_window_losses(params, config, tokens), rtol=tol.LOSS_F32)


@pytest.mark.parametrize("case", ["llama-attention-bias", "llama-gqa-tied", "opt-pre-ln", "opt-post-ln"])
def test_loss_and_grad_match_pytorch(case):
  """Loss and gradient of every parameter against transformers' PyTorch model and autograd, float32."""
  torch = pytest.importorskip("torch")
  from test_models import build_hf, convert

  model = build_hf(case)
  config, params = convert(model)
  ids = np.random.default_rng(1).integers(0, 101, size=(3, 13)).astype(np.int32)
  weights = np.asarray([1.0, 0.5, 0.0], np.float32)
  model.zero_grad()
  logits = model(torch.tensor(ids, dtype=torch.long)).logits[:, :-1]
  nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.tensor(ids[:, 1:], dtype=torch.long),
                                          reduction="none").mean(1)
  w = torch.tensor(weights)
  want_loss = (nll * w).sum() / w.sum()
  want_loss.backward()
  want = {name: p.grad.numpy() for name, p in model.named_parameters()}
  loss, grads = Runner(config).loss_and_grad(params, jnp.asarray(ids), jnp.asarray(weights))
  assert float(loss) == pytest.approx(want_loss.item(), rel=tol.LOSS_F32)
  got = params_to_hf(grads, config)
  assert set(got) == set(want) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
  scale = max(np.abs(g).max() for g in want.values())  # k_proj.bias has an exactly-zero gradient: no own scale
  for name, g in got.items():
    np.testing.assert_allclose(g / scale, want[name] / scale, atol=1e-5, err_msg=name)


def test_trainable_subset_and_remat(model, tokens):
  config, params = model
  weights = jnp.ones((3,), jnp.float32)
  runner = Runner(config)
  full_loss, full = runner.loss_and_grad(params, tokens, weights)
  norms_only = jax.tree_util.tree_map_with_path(lambda path, _: "norm" in jax.tree_util.keystr(path), params)
  loss, grads = runner.loss_and_grad(params, tokens, weights, trainable=norms_only, remat=True)
  tol.assert_reordered(loss, full_loss, "loss")
  kept = jax.tree.map(lambda g, m: g if m else None, full, norms_only)
  assert jax.tree.structure(grads) == jax.tree.structure(kept)
  scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(kept))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(kept), strict=True):
    tol.assert_within(a, b, tol.REORDERED_F32 * scale, "gradient")


def test_eight_devices_equal_one(model, tokens):
  config, params = model
  tok = jnp.concatenate([tokens, tokens[:1] + 1, tokens[:2] * 2 % 61, tokens[:2]])  # 8 windows
  weights = jnp.ones((8,), jnp.float32)
  one = Runner(config)
  eight = Runner(config, mesh=make_mesh())
  assert eight.mesh.shape["data"] == 8
  tol.assert_reordered(eight.window_losses(eight.replicate(params), tok), one.window_losses(params, tok), "losses")
  (la, ga), (lb, gb) = one.loss_and_grad(params, tok, weights), eight.loss_and_grad(params, tok, weights)
  tol.assert_reordered(lb, la, "loss")
  scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(ga))  # k_proj.bias: exactly 0, rounding only
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
    tol.assert_within(b, a, tol.REORDERED_F32 * scale, "gradient")


def test_loss_and_grad_compiles_once(tokens):
  config = LLAMA.replace(hidden_size=28, num_heads=7, num_kv_heads=1, head_dim=4)  # a shape no other test uses
  params = M.init_params(config, jax.random.key(3))
  runner = Runner(config)
  weights = jnp.ones((3,), jnp.float32)
  before = F.loss_and_grad._cache_size()
  for _ in range(3):
    runner.loss_and_grad(params, tokens, weights)
  assert F.loss_and_grad._cache_size() == before + 1


def test_only_the_runner_jits_a_model_forward():
  """No module outside ``jaxprune/runner`` calls the model's forward functions (``embed``, ``block``, ``head``,
  ``forward`` of ``jaxprune.models``): every pass goes through the runner."""
  root = pathlib.Path(__file__).parents[1] / "jaxprune"
  forward = {"embed", "block", "head", "forward"}
  offenders = []
  for path in root.rglob("*.py"):
    if "runner" in path.parts or "models" in path.parts:
      continue
    tree = ast.parse(path.read_text())
    aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and (node.module or "").startswith("jaxprune.models") for a in node.names
               if a.name in ("_model",)}
    direct = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              and (node.module or "").startswith("jaxprune.models") for a in node.names if a.name in forward}
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
          and node.attr in forward:
        offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    offenders += [f"{path.relative_to(root)}: imports {name}" for name in direct]
  assert not offenders, offenders


def _brute_force_factors(params, config, tokens):
  """Per window: taps and the gradient at every linear's output of that window's summed next-token loss (data
  labels), by ``jax.vmap(jax.grad)`` over windows; then Σ a aᵀ, Σ a and Σ g gᵀ in float64 NumPy."""
  groups = [M.present_linears(config, block) for block in params["layers"]]

  def window_loss(deltas, tok):
    tok = tok[None]
    ctx = M.context(config, 1, tok.shape[1])
    h = M.embed(params, tok, config=config)
    taps = []
    for block, d, modes in zip(params["layers"], deltas, [config.sublayer_modes(i) for i in range(2)]):
      h, t = M.block(block, h, ctx, config=config, modes=modes, taps=True, deltas={k: v[None] for k, v in d.items()})
      taps.append(t)
    logp = jax.nn.log_softmax(M.head(params, h, config=config)[0, :-1], axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, tok[0, 1:, None], axis=-1)), taps

  b, t = tokens.shape
  zeros = [{p: jnp.zeros((t, tree_get(block, p)["kernel"].shape[1]), jnp.float64) for ps in g.values() for p in ps}
           for block, g in zip(params["layers"], groups)]
  grads, taps = jax.jit(jax.vmap(jax.grad(window_loss, has_aux=True), in_axes=(None, 0)))(zeros, tokens)
  out = []
  for i, g in enumerate(groups):
    a = {tap: np.asarray(taps[i][tap], np.float64).reshape(-1, np.shape(taps[i][tap])[-1]) for tap in g}
    gr = {p: np.asarray(grads[i][p], np.float64).reshape(-1, np.shape(grads[i][p])[-1])
          for ps in g.values() for p in ps}
    out.append({"A": {k: v.T @ v for k, v in a.items()}, "a": {k: v.sum(0) for k, v in a.items()},
                "G": {k: v.T @ v for k, v in gr.items()}})
  return out


def test_curvature_equals_brute_force_in_float64():
  config = LLAMA.replace(qkv_bias=True)
  tokens = np.random.default_rng(2).integers(0, 61, size=(5, 9)).astype(np.int32)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), M.init_params(config, jax.random.key(4)))
    got = Runner(config, batch_size=2).curvature(params, tokens, key=jax.random.key(0), sampled=False)
    want = _brute_force_factors(params, config, jnp.asarray(tokens))
  for layer_got, layer_want in zip(got, want, strict=True):
    assert layer_got["count"] == tokens.size
    for kind in ("A", "a", "G"):
      assert set(layer_got[kind]) == set(layer_want[kind])
      for name, value in layer_want[kind].items():
        tol.assert_within(layer_got[kind][name], value, tol.SOLVER_F64 * np.abs(value).max(), f"{kind} {name}")


def test_curvature_sampled_labels_are_seeded_and_sharded_equals_one_device():
  config, params = LLAMA, M.init_params(LLAMA, jax.random.key(0))
  tokens = np.random.default_rng(3).integers(0, 61, size=(8, 9)).astype(np.int32)
  one = Runner(config, batch_size=8).curvature(params, tokens, key=jax.random.key(1))
  again = Runner(config, batch_size=8).curvature(params, tokens, key=jax.random.key(1))
  eight = Runner(config, batch_size=8, mesh=make_mesh()).curvature(params, tokens, key=jax.random.key(1))
  data = Runner(config, batch_size=8).curvature(params, tokens, key=jax.random.key(1), sampled=False)
  for a, b, c, d in zip(one, again, eight, data, strict=True):
    for name in a["G"]:
      np.testing.assert_array_equal(a["G"][name], b["G"][name])  # the same computation twice
      tol.assert_reordered(c["G"][name], a["G"][name], f"G {name}")
      assert not np.allclose(a["G"][name], d["G"][name])  # sampled labels are not the data's


def test_model_axis_shards_parameters_and_keeps_results():
  """With a ``model`` axis of 8, each device holds about 1/8 of the parameters, and the losses, the gradients and
  a pruning pass equal those of one device."""
  config = LLAMA.replace(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                         vocab_size=64)
  params = M.init_params(config, jax.random.key(5))
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, 64, size=(4, 9)), jnp.int32)
  sharded = Runner(config, mesh=make_mesh(model=8))
  placed = sharded.place(params)
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  device0 = sum(s.data.nbytes for x in jax.tree.leaves(placed) for s in x.addressable_shards
                if s.device == jax.devices()[0])
  vectors = sum(x.nbytes for x in jax.tree.leaves(params) if x.ndim < 2)
  assert device0 == (total - vectors) / 8 + vectors
  tol.assert_reordered(sharded.window_losses(placed, tokens), Runner(config).window_losses(params, tokens), "losses")
  from jaxprune.prune import Unstructured
  from jaxprune.prune._sequential import PruneSpec, kernel_at, run_pass

  spec = PruneSpec("wanda", Unstructured(0.5))
  one = run_pass(params, config, spec, np.asarray(tokens), batch_size=4, progress=False)
  two_by_four = run_pass(params, config, spec, np.asarray(tokens), batch_size=4, progress=False,
                         mesh=make_mesh(model=4))
  assert all(isinstance(b, np.ndarray) for b in jax.tree.leaves(two_by_four.params["layers"]))  # off the devices
  tol.assert_passes_agree(two_by_four.masks, two_by_four.params["layers"], one.masks, one.params["layers"], kernel_at)


def test_block_mse_and_gradient_equal_a_float64_reference():
  """``Runner.block_value_and_grad``: the weighted mean over windows of the block output's mean squared error, and
  its gradient over a trainable subset assembled with the frozen rest, against ``jax.grad`` of the model's block
  in float64."""
  config = LLAMA
  tokens = np.random.default_rng(7).integers(0, 61, size=(3, 9)).astype(np.int32)
  weights = np.asarray([1.0, 0.5, 0.0])
  with jax.enable_x64(True):
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), M.init_params(config, jax.random.key(8)))
    block = params["layers"][1]
    h = M.embed(params, jnp.asarray(tokens), config=config)
    target = h + 0.1 * jnp.asarray(np.random.default_rng(9).standard_normal(h.shape))
    norms = jax.tree_util.tree_map_with_path(lambda path, _: "norm" in jax.tree_util.keystr(path), block)
    trainable, frozen = F.split(block, norms)
    loss, grads = Runner(config).block_value_and_grad(trainable, frozen, h, target, jnp.asarray(weights))

    def reference(trainable):
      out = M.block(F._combine(trainable, frozen), h, M.context(config, 3, 9), config=config)
      per_window = jnp.mean((out - target) ** 2, axis=(1, 2))
      return jnp.sum(per_window * weights) / jnp.sum(weights)

    want_loss, want = jax.jit(jax.value_and_grad(reference))(trainable)
  assert float(loss) == pytest.approx(float(want_loss), rel=tol.F64_REFERENCE)
  assert jax.tree.structure(grads) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
    tol.assert_within(a, b, tol.SOLVER_F64 * np.abs(np.asarray(b)).max(), "gradient")
    assert np.abs(np.asarray(b)).max() > 0


def test_gathered_writes_into_memory_of_its_shape_only():
  parts = [np.full((2, 3), k, np.float32) for k in range(3)]
  into = np.zeros((6, 3), np.float32)
  out = gathered(iter(parts), 6, into=into)
  assert out is into
  np.testing.assert_array_equal(out, np.repeat(np.arange(3, dtype=np.float32), 2)[:, None] * np.ones(3))
  for other in (np.zeros((5, 3), np.float32), np.zeros((6, 3), np.float64), None):
    fresh = gathered(iter(parts), 6, into=other)
    assert fresh is not other and fresh.shape == (6, 3) and fresh.dtype == np.float32
    np.testing.assert_array_equal(fresh, out)
  with pytest.raises(ValueError, match="gathered 6 rows, expected 7"):
    gathered(iter(parts), 7)


def test_fetched_ahead_starts_the_next_batch_before_fetching_one():
  events = []

  def outputs():
    for b, real in enumerate((2, 2, 1)):
      events.append(f"start {b}")
      yield jnp.full((2, 3), float(b)), real

  parts = []
  for part in fetched_ahead(outputs()):
    events.append(f"got {len(parts)}")
    parts.append(part)
  assert events == ["start 0", "start 1", "got 0", "start 2", "got 1", "got 2"]
  assert [p.shape for p in parts] == [(2, 3), (2, 3), (1, 3)] and all(p.dtype == np.float32 for p in parts)
  np.testing.assert_array_equal(np.concatenate(parts)[:, 0], [0, 0, 1, 1, 2])
  assert list(fetched_ahead(iter(()))) == []
