"""Models held and computed in bfloat16 or float16: logits near float32's, every product at its stated precision,
the pass in the model's dtype with float32 solvers, checkpoints and exports that keep the dtype, one-line errors
for a dtype a model cannot be held in."""
from __future__ import annotations

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.cli import main
from jaxprune.errors import JaxpruneError
from jaxprune.io import load_model
from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig
from jaxprune.prune import Unstructured
from jaxprune.prune import _job as job
from jaxprune.prune._resume import ResumeStore
from jaxprune.prune._sequential import PruneSpec, run_pass
from jaxprune.runner import Runner
from tolerances import NARROW_LOGITS_UNITS, assert_within, unit_roundoff

CONFIGS = {
    "llama": ModelConfig(family="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=4,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
                         tie_word_embeddings=True),
    "opt": ModelConfig(family="opt", vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=4,
                       num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=64,
                       tie_word_embeddings=True, activation="relu"),
}
TOKENS = np.random.default_rng(0).integers(0, 101, (2, 40)).astype(np.int32)


def _promotion(family: str):
  """Flax's ``nn.LayerNorm`` (OPT) widens its statistics with ``jnp.promote_types(bfloat16, float32)``, which
  strict promotion refuses; it is the intended float32 computation, so OPT runs under standard promotion."""
  return jax.numpy_dtype_promotion("standard") if family == "opt" else contextlib.nullcontext()


def _cast(params, dtype):
  return jax.tree.map(lambda x: jnp.asarray(x).astype(dtype), params)


def _logits(params, config: ModelConfig):
  """Logits ``(2, 40, vocab)`` of :data:`TOKENS`: the runner's jitted embedding and blocks, then the head."""
  runner = Runner(config)
  h = runner.embed(params, TOKENS)
  for block in params["layers"]:
    h = runner.block(block, h)
  return M.head(params, h, config=config)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_narrow_logits_within_tolerance_of_float32(family, dtype):
  """The same weights (rounded to ``dtype``) computed in ``dtype`` and in float32: logits (float32 either way)
  within ``NARROW_LOGITS_UNITS`` unit roundoffs of ``dtype``, relative to the largest logit."""
  config = CONFIGS[family]
  narrow = _cast(M.init_params(config, jax.random.key(0)), dtype)
  with _promotion(family):
    got = _logits(narrow, config)
    want = _logits(_cast(narrow, jnp.float32), config)
  assert got.dtype == jnp.float32
  scale = float(np.max(np.abs(np.asarray(want))))
  assert_within(got, want, NARROW_LOGITS_UNITS * unit_roundoff(jnp.dtype(dtype)) * scale, f"{dtype} logits")


def _dot_generals(jaxpr) -> list:
  """Every ``dot_general`` equation of ``jaxpr``, inner jaxprs (jit, map, custom calls) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn)
    for value in eqn.params.values():
      for inner in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(inner, jax.extend.core.ClosedJaxpr):
          found += _dot_generals(inner.jaxpr)
        elif isinstance(inner, jax.extend.core.Jaxpr):
          found += _dot_generals(inner)
  return found


@pytest.mark.parametrize("dtype, precision", [("float32", jax.lax.Precision.HIGHEST),
                                              ("bfloat16", jax.lax.Precision.DEFAULT)])
def test_every_product_of_the_forward_takes_the_stated_precision(dtype, precision):
  """float32 models multiply at ``HIGHEST`` (not a GPU's TF32 or a TPU's one bfloat16 pass), narrower ones at the
  backend's default; every product accumulates in float32."""
  config = CONFIGS["llama"]
  params = _cast(M.init_params(config, jax.random.key(0)), dtype)
  jaxpr = jax.make_jaxpr(lambda p, t: M.forward(p, t, config=config))(params, TOKENS)
  dots = _dot_generals(jaxpr.jaxpr)
  assert len(dots) >= 7 * config.num_layers  # seven linears and the attention products per block, the head
  allowed = {(precision, precision)} | ({None} if precision == jax.lax.Precision.DEFAULT else set())
  for eqn in dots:
    assert eqn.params["precision"] in allowed, eqn
    assert eqn.params["preferred_element_type"] == jnp.float32, eqn


def test_pass_in_bfloat16_prunes_as_float32_would_and_keeps_the_dtype():
  """Magnitude scores are exact in any dtype: a bfloat16 pass picks the masks of the float32 pass on the same
  weights, and returns them unchanged in bfloat16; SparseGPT runs in bfloat16 with its float32 solver and
  returns its updated weights in bfloat16."""
  config = CONFIGS["llama"]
  narrow = jax.tree.map(np.asarray, _cast(M.init_params(config, jax.random.key(1)), jnp.bfloat16))
  spec = PruneSpec("magnitude", Unstructured(0.5))
  got = job.prune(narrow, None, config=config, spec=spec, progress=False)
  want = job.prune(jax.tree.map(lambda x: x.astype(np.float32), narrow), None, config=config, spec=spec, progress=False)
  for a, b in zip(jax.tree.leaves(got.masks), jax.tree.leaves(want.masks)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(a.astype(np.float32), b)
  calib = TOKENS[:, :16]
  out = job.prune(narrow, calib, config=config, spec=PruneSpec("sparsegpt", Unstructured(0.5)), batch_size=2,
                  progress=False)
  assert {leaf.dtype for leaf in jax.tree.leaves(out.params)} == {jnp.dtype(jnp.bfloat16)}
  assert out.metadata["sparsity"] == 0.5
  assert all(np.isfinite(r["error"]) and r["error"] > 0 for r in out.metadata["layers"])


class _Crash(Exception):
  pass


def test_bfloat16_pass_resumed_after_a_crash_equals_the_uninterrupted_one(tmp_path):
  """The resume state keeps bfloat16 blocks bfloat16 (``np.savez`` writes them as 2-byte voids)."""
  config = CONFIGS["llama"]
  narrow = jax.tree.map(np.asarray, _cast(M.init_params(config, jax.random.key(2)), jnp.bfloat16))
  spec, calib = PruneSpec("wanda", Unstructured(0.5)), TOKENS[:, :16]
  full = job.prune(narrow, calib, config=config, spec=spec, batch_size=2, progress=False)
  out = tmp_path / "ck"
  store = ResumeStore(out, {"model": "tiny", **spec.to_json()})

  def crash_after_two(state):
    store.save(state)
    if state.done == 2:
      raise _Crash

  with pytest.raises(_Crash):
    run_pass(narrow, config, spec, calib, batch_size=2, on_block=crash_after_two, progress=False)
  assert store.load(narrow).done == 2
  resumed = job.prune(narrow, calib, config=config, spec=spec, out=out, identity={"model": "tiny"}, batch_size=2,
                      progress=False)
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params)):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(a, b)


def _hf_dir(path, dtype=None, *, big: float | None = None):
  """A tiny random LLaMA saved by transformers (in ``dtype``, a torch dtype name; with one weight set to
  ``big``)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  model = transformers.LlamaForCausalLM(cfg).eval()
  if big is not None:
    with torch.no_grad():
      model.model.layers[0].mlp.up_proj.weight[0, 0] = big
  (model if dtype is None else model.to(getattr(torch, dtype))).save_pretrained(path)
  return path


def run(capsys, *argv):
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def _leaf_dtypes(params) -> set[str]:
  return {np.dtype(leaf.dtype).name for leaf in jax.tree.leaves(params)}


def test_bfloat16_prune_checkpoint_reloads_evaluates_and_exports_as_bfloat16(tmp_path, capsys):
  from safetensors import safe_open

  src = _hf_dir(tmp_path / "src", "bfloat16")
  assert _leaf_dtypes(load_model(str(src)).params) == {"bfloat16"}  # a Hugging Face directory's stored dtype
  rng = np.random.default_rng(0)
  np.save(tmp_path / "calib.npy", rng.integers(0, 64, (4, 16)).astype(np.int32))
  np.save(tmp_path / "eval.npy", rng.integers(0, 64, (3, 16)).astype(np.int32))
  ck = tmp_path / "ck"
  # The method is immaterial to the dtypes (SparseGPT's bfloat16 pass: the test above); Wanda compiles least.
  code, _, err = run(capsys, "prune", "--model", src, "--method", "wanda", "--calib", tmp_path / "calib.npy",
                     "--nsamples", 4, "--seqlen", 16, "--out", ck, "--eval", tmp_path / "eval.npy", "--json",
                     tmp_path / "prune.json")
  assert code == 0, err
  assert json.loads((tmp_path / "prune.json").read_text())["eval"]["dtype"] == "bfloat16"
  assert json.loads((ck / "jaxprune.json").read_text())["dtype"] == "bfloat16"
  loaded = load_model(str(ck))
  assert loaded.dtype == "bfloat16" and _leaf_dtypes(loaded.params) == {"bfloat16"}
  code, _, err = run(capsys, "eval", "--model", ck, "--data", tmp_path / "eval.npy", "--json", tmp_path / "e.json")
  assert code == 0, err
  assert json.loads((tmp_path / "e.json").read_text())["eval"]["dtype"] == "bfloat16"
  assert run(capsys, "export", "--model", ck, "--out", tmp_path / "hf")[0] == 0
  with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  code, _, err = run(capsys, "convert", "--model", src, "--dtype", "float32", "--out", tmp_path / "ck32")
  assert code == 0, err
  assert _leaf_dtypes(load_model(str(tmp_path / "ck32")).params) == {"float32"}
  assert _leaf_dtypes(load_model(str(tmp_path / "ck32"), dtype="float16").params) == {"float16"}


def test_a_dtype_the_model_cannot_be_held_in_is_one_line(tmp_path, capsys):
  src = _hf_dir(tmp_path / "src", big=1e6)
  with pytest.raises(JaxpruneError, match="dtype must be one of float32, bfloat16, float16, got 'int8'"):
    load_model(str(src), dtype="int8")
  with pytest.raises(JaxpruneError, match="got 'float64'"):
    load_model(str(src), dtype=np.float64)
  with pytest.raises(SystemExit):  # argparse: invalid choice
    main(["eval", "--model", str(src), "--dtype", "int8"])
  assert "invalid choice: 'int8'" in capsys.readouterr().err
  code, _, err = run(capsys, "eval", "--model", src, "--dtype", "float16")
  errors = [line for line in err.splitlines() if "error:" in line]
  assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
  assert "cannot be held in float16" in errors[0] and "65504" in errors[0]
  assert _leaf_dtypes(load_model(str(src), dtype="bfloat16").params) == {"bfloat16"}  # bfloat16 has the range
