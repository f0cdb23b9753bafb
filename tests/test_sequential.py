"""The layer-by-layer pass on a tiny random model: compile once, sharded equals unsharded, resume equals one go."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxprune.errors import JaxpruneError
from jaxprune.models import _model as M
from jaxprune.runner import _forward as F
from jaxprune.models._config import ModelConfig
from jaxprune.prune import NM, Unstructured
from jaxprune.prune import _job as job, _sequential as S
from jaxprune.prune._resume import ResumeStore
import tolerances as tol

CONFIG = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
                     num_kv_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def params():
  return jax.tree.map(np.asarray, M.init_params(CONFIG, jax.random.key(0)))


@pytest.fixture(scope="module")
def calib():
  return np.random.default_rng(0).integers(0, 97, size=(8, 16)).astype(np.int32)


def _same(a, b):
  """Bitwise: the same computation run twice, or a checkpoint's round trip."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "admm"])
def test_pass_prunes_every_linear_exactly(params, calib, method):
  spec = S.PruneSpec(method, NM(2, 4), (("iterations", 4), ("mask_iterations", 3)) if method == "admm" else ())
  state = S.run_pass(params, CONFIG, spec, calib, batch_size=4, progress=False)
  assert state.done == CONFIG.num_layers and len(state.reports) == CONFIG.num_layers
  for i, block in enumerate(state.reports):
    assert {r["name"] for r in block} == {p for g in M.linear_groups(CONFIG).values() for p in g}
    for r in block:
      k = np.asarray(S.kernel_at(state.params["layers"][i], r["name"]))
      groups = (k.T != 0).reshape(k.shape[1], -1, 4).sum(-1)  # (d_out, d_in/4) kept per group
      assert groups.max() <= 2 and r["sparsity"] == 0.5
  # Embeddings, norms and head are untouched.
  np.testing.assert_array_equal(state.params["embed"]["embed_tokens"]["embedding"],
                                params["embed"]["embed_tokens"]["embedding"])


def test_one_compilation_serves_all_blocks(params, calib, monkeypatch):
  spec = S.PruneSpec("sparsegpt", Unstructured(0.5), (("blocksize", 8),))
  F.block.clear_cache()
  F.taps.clear_cache()
  S._jitted_solver.cache_clear()
  S._jitted_prepare.cache_clear()
  prepare, widths = S.jitted_prepare(spec), []

  def counted(stats):  # the pass's calls; the spec check before it only traces
    if not isinstance(stats.gram, jax.core.Tracer):
      widths.append(stats.gram.shape[0])
    return prepare(stats)

  monkeypatch.setattr(S, "jitted_prepare", lambda spec: counted)
  S.run_pass(params, CONFIG, spec, calib, batch_size=4, progress=False)
  assert F.block._cache_size() == 1  # 4 blocks, one compilation
  assert F.taps._cache_size() == 1
  # Distinct linear shapes: q/o (32x32), k/v (16x32), gate/up (48x32), down (32x48).
  assert S.jitted_solver(spec)._cache_size() == 4
  # SparseGPT's factorisation: once per input group (q/k/v, o, gate/up, down) of every block, compiled once per
  # input width (32, 48).
  assert widths == [32, 32, 32, 48] * CONFIG.num_layers
  assert prepare._cache_size() == 2


# In the default suite, a pass on a (data, model) mesh runs in test_runner's model-axis test (Wanda) and in
# test_multihost (SparseGPT over processes), and SparseGPT's rows split over `model` in test_solvers.
@pytest.mark.parametrize("spec", [
    pytest.param(S.PruneSpec("sparsegpt", Unstructured(0.6), (("blocksize", 8),)), marks=pytest.mark.slow),  # 17 s
    pytest.param(S.PruneSpec("admm", Unstructured(0.5), (("iterations", 4), ("mask_iterations", 3)),
                             true_sequential=True), marks=pytest.mark.slow),  # 13 s
], ids=["sparsegpt", "admm-true-sequential"])
def test_sharded_pass_equals_unsharded(params, calib, spec):
  assert jax.device_count() == 8
  plain = S.run_pass(params, CONFIG, spec, calib, batch_size=4, progress=False)
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
  sharded = S.run_pass(params, CONFIG, spec, calib, batch_size=4, mesh=mesh, progress=False)
  tol.assert_passes_agree(plain.masks, plain.params["layers"], sharded.masks, sharded.params["layers"], S.kernel_at)


class _Crash(Exception):
  pass


def test_resume_after_crash_equals_uninterrupted(params, calib, tmp_path):
  spec = S.PruneSpec("wanda", Unstructured(0.5))
  out = tmp_path / "ckpt"
  full = job.prune(params, calib, config=CONFIG, spec=spec, batch_size=4, progress=False)
  store = ResumeStore(out, {"model": "tiny", **spec.to_json()})

  def crash_after_two(state):
    store.save(state)
    if state.done == 2:
      raise _Crash

  with pytest.raises(_Crash):
    S.run_pass(params, CONFIG, spec, calib, batch_size=4, on_block=crash_after_two, progress=False)
  resumed_state = store.load(params)
  assert resumed_state.done == 2
  resumed = job.prune(params, calib, config=CONFIG, spec=spec, out=out, identity={"model": "tiny"}, batch_size=4,
                      progress=False)
  _same(full.params, resumed.params)
  assert resumed.metadata["layers"] == full.metadata["layers"]
  other = ResumeStore(out, {"model": "other", **spec.to_json()})
  with pytest.raises(JaxpruneError, match="different run"):
    other.load(params)


def test_checkpoint_round_trip_with_masks(params, calib, tmp_path):
  from jaxprune.io._checkpoint import read_checkpoint

  spec = S.PruneSpec("magnitude", Unstructured(0.7))
  outcome = job.prune(params, None, config=CONFIG, spec=spec, progress=False)
  assert abs(outcome.metadata["sparsity"] - 0.7) < 0.01
  job.save_outcome(outcome, tmp_path / "c", CONFIG)
  config, restored, masks, meta = read_checkpoint(tmp_path / "c", with_masks=True)
  assert config == CONFIG and meta["method"] == "magnitude"
  _same(outcome.params, restored)
  m = np.asarray(masks["layers"][1]["mlp"]["down_proj"]["kernel"])
  np.testing.assert_array_equal(m, np.asarray(restored["layers"][1]["mlp"]["down_proj"]["kernel"]) != 0)


def test_windows_not_dividing_the_mesh_are_padded_without_changing_the_result(params, calib):
  spec = S.PruneSpec("wanda", Unstructured(0.5))
  plain = S.run_pass(params, CONFIG, spec, calib[:6], batch_size=4, progress=False)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  padded = S.run_pass(params, CONFIG, spec, calib[:6], batch_size=4, mesh=mesh, progress=False)
  tol.assert_passes_agree(plain.masks, plain.params["layers"], padded.masks, padded.params["layers"], S.kernel_at)
  tol.assert_reordered(plain.inputs, padded.inputs, "next block's inputs")


def test_one_device_mesh_sums_wandas_statistics_in_the_block_program(params, calib, monkeypatch):
  # The command line always passes a mesh; on one device Wanda's squared norms are summed inside the tapped
  # block (Runner.tap_sums) as without a mesh, not written out as taps and added by the statistics step.
  from jaxprune.runner import Runner

  spec = S.PruneSpec("wanda", Unstructured(0.5))
  plain = S.run_pass(params, CONFIG, spec, calib, batch_size=4, progress=False)
  calls = []
  for name in ("taps", "tap_sums"):
    method = getattr(Runner, name)
    monkeypatch.setattr(Runner, name, lambda self, *a, _m=method, _n=name, **k: calls.append(_n) or _m(self, *a, **k))
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  state = S.run_pass(params, CONFIG, spec, calib, batch_size=4, mesh=mesh, progress=False)
  assert calls == ["tap_sums"] * 2 * CONFIG.num_layers  # two batches of 4 windows per block
  tol.assert_passes_agree(plain.masks, plain.params["layers"], state.masks, state.params["layers"], S.kernel_at)
  tol.assert_reordered(state.inputs, plain.inputs, "next block's inputs")


OPT_CONFIG = ModelConfig(family="opt", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                         num_kv_heads=4, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True,
                         pre_norm=False, activation="relu", qkv_bias=True, o_bias=True, mlp_bias=True,
                         norm_affine=True)


def _true_sequential_by_full_forwards(params, config, spec, calib, *, default_order: bool = False):
  """The true-sequential order done the slow, obvious way: for each group, a full forward of the block with the
  groups before it pruned, its input tapped; the block output from a full forward of the pruned block. With
  ``default_order``, every group's input is tapped from the dense block instead. Returns ``(layers, masks, h)``,
  ``h`` the stream leaving the last pruned block."""
  ctx = M.context(config, *calib.shape)
  h = M.embed(params, calib, config=config)
  layers, masks = [], []
  for i, block in enumerate(params["layers"]):
    block_masks, modes = {}, config.sublayer_modes(i)
    dense = block
    for tap, paths in S.block_linears(config, block).items():
      x = M.block(dense if default_order else block, h, ctx, config=config, modes=modes, taps=True)[1][tap]
      stats = S.accumulate(S.init_stats(x.shape[-1], gram=S.get_solver(spec.method).needs_gram), x)
      for path in paths:
        kernel, block_masks[path], *_ = S._solve(spec, S.kernel_at(block, path), stats, None)
        block = S._set_kernel(block, path, kernel)
    h = M.block(block, h, ctx, config=config, modes=modes)
    layers.append(block)
    masks.append(block_masks)
  return layers, masks, h


@pytest.mark.parametrize("family", ["llama", pytest.param("opt", marks=pytest.mark.slow)])  # 7 s each
def test_true_sequential_equals_group_by_group_full_forwards(calib, family):
  config = CONFIG if family == "llama" else OPT_CONFIG
  params = jax.tree.map(np.asarray, M.init_params(config, jax.random.key(1)))
  spec = S.PruneSpec("sparsegpt", Unstructured(0.5), (("blocksize", 8),), true_sequential=True)
  state = S.run_pass(params, config, spec, calib, batch_size=3, progress=False)  # 8 windows: a padded batch
  layers, masks, h = _true_sequential_by_full_forwards(params, config, spec, calib)
  tol.assert_passes_agree(state.masks, state.params["layers"], masks, layers, S.kernel_at)
  tol.assert_reordered(state.inputs, h, "the stream leaving the last block")  # its memory reused (run_pass)
  # It differs from the default order, in which all groups see the dense block's inputs.
  default = S.run_pass(params, config, S.PruneSpec("sparsegpt", Unstructured(0.5), (("blocksize", 8),)), calib,
                       batch_size=3, progress=False)
  assert any((a[n] != b[n]).any() for a, b in zip(default.masks, state.masks) for n in a)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_true_sequential_with_removed_sublayers(calib, family):
  # Block 1 has no attention, block 2 no MLP: the residual stream kept for the block output comes from the first
  # MLP group whatever precedes it, and a block without MLP computes its output from its attention.
  config = (CONFIG if family == "llama" else OPT_CONFIG).replace(
      num_layers=3, sublayers=(("full", "full"), ("skip", "full"), ("full", "bias")))
  params = jax.tree.map(np.asarray, M.init_params(config, jax.random.key(2)))
  spec = S.PruneSpec("wanda", Unstructured(0.5), true_sequential=True)
  state = S.run_pass(params, config, spec, calib, batch_size=3, progress=False)
  layers, masks, h = _true_sequential_by_full_forwards(params, config, spec, calib)
  assert [set(m) for m in state.masks] == [set(m) for m in masks]
  assert not any(name.startswith("self_attn/") for name in state.masks[1])
  assert all(name.startswith("self_attn/") for name in state.masks[2]) and state.masks[2]
  tol.assert_passes_agree(state.masks, state.params["layers"], masks, layers, S.kernel_at)
  tol.assert_reordered(state.inputs, h, "next block's inputs")


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_default_order_equals_full_forwards_block_after_block(params, calib, method):
  # Four blocks: the activations of block i + 2 go into the memory of block i's (run_pass's two host arrays);
  # every block's result and the stream leaving the last one are held to the obvious way. Wanda's statistics are
  # summed inside the block's program, SparseGPT's Gram by the statistics step.
  spec = S.PruneSpec(method, Unstructured(0.5), (("blocksize", 8),) if method == "sparsegpt" else ())
  state = S.run_pass(params, CONFIG, spec, calib, batch_size=3, progress=False)
  layers, masks, h = _true_sequential_by_full_forwards(params, CONFIG, spec, calib, default_order=True)
  tol.assert_passes_agree(state.masks, state.params["layers"], masks, layers, S.kernel_at)
  tol.assert_reordered(state.inputs, h, "the stream leaving the last block")


def test_true_sequential_compiles_once_per_group(params, calib):
  spec = S.PruneSpec("wanda", Unstructured(0.5), true_sequential=True)
  F.tap_sums.clear_cache()
  F.block.clear_cache()
  S.run_pass(params, CONFIG, spec, calib, batch_size=4, progress=False)
  assert F.tap_sums._cache_size() == len(M.linear_groups(CONFIG))  # 4 blocks, one compilation per group
  assert F.block._cache_size() == 1
