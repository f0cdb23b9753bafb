"""Structured shrinking (``jaxprune.models._compact``): dead MLP units and groups of heads are removed, the model
computes the same logits with per-layer widths (the removed terms are exact zeros: float32 to within summation
order), checkpoints and evaluates, and exports (padded back with zeros) to a
Hugging Face directory that transformers loads with the same logits."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import jitted
import tolerances as tol
from jaxprune.io._checkpoint import read_checkpoint, save_checkpoint
from jaxprune.models import _model as M
from jaxprune.models._compact import compact, pad
from jaxprune.models._config import ModelConfig

LLAMA = ModelConfig(family="llama", vocab_size=61, hidden_size=32, intermediate_size=24, num_layers=3, num_heads=4,
                    num_kv_heads=2, head_dim=8, max_position_embeddings=32, tie_word_embeddings=False,
                    qkv_bias=True, norm_eps=1e-5)
OPT = ModelConfig(family="opt", vocab_size=61, hidden_size=32, intermediate_size=24, num_layers=3, num_heads=4,
                  num_kv_heads=4, head_dim=8, max_position_embeddings=32, tie_word_embeddings=True, norm_eps=1e-5,
                  qkv_bias=True, o_bias=True, mlp_bias=True, activation="relu")
TOKENS = np.random.default_rng(0).integers(0, 61, size=(2, 11)).astype(np.int32)


def _killed(config: ModelConfig):
  """Random params with, per layer, some MLP units and one group of heads made dead in each of the ways the module
  recognises (zero output row; zero input column and bias; zero value rows and bias; zero output columns)."""
  params = jax.tree.map(np.array, M.init_params(config, jax.random.key(1)))
  opt = config.family == "opt"
  hd, per = config.head_dim, config.num_heads // config.num_kv_heads
  for i, block in enumerate(params["layers"]):
    attn = block["self_attn"]
    mlp_in = block["fc1"] if opt else block["mlp"]["up_proj" if i == 1 else "gate_proj"]
    mlp_out = block["fc2"] if opt else block["mlp"]["down_proj"]
    mlp_out["kernel"][[2, 5]] = 0  # units 2 and 5: nothing reads them
    mlp_in["kernel"][:, 7] = 0  # unit 7: its input row and bias are zero
    if "bias" in mlp_in:
      mlp_in["bias"][7] = 0
    if i == 0:  # group 1: its value rows and bias are zero
      attn["v_proj"]["kernel"][:, hd:2 * hd] = 0
      attn["v_proj"]["bias"][hd:2 * hd] = 0
    elif i == 1:  # group 0: no output column reads its heads
      attn["out_proj" if opt else "o_proj"]["kernel"][:per * hd] = 0
  return params


@pytest.mark.parametrize("config", [LLAMA, OPT], ids=["llama-gqa", "opt"])
def test_compact_removes_dead_units_and_heads_and_keeps_the_logits(config):
  params = _killed(config)
  small, cfg, _ = compact(params, config)
  groups = config.num_kv_heads - 1
  assert cfg.layer_widths == ((21, groups * config.num_heads // config.num_kv_heads, groups),
                              (21, groups * config.num_heads // config.num_kv_heads, groups),
                              (21, config.num_heads, config.num_kv_heads))
  want = np.asarray(jitted.forward(params, TOKENS, config=config))
  got = np.asarray(jitted.forward(small, TOKENS, config=cfg))
  tol.assert_reordered(got, want, "logits")  # the same function; the removed terms were exact zeros
  assert sum(x.size for x in jax.tree.leaves(small)) < sum(x.size for x in jax.tree.leaves(params))
  # Padding restores the uniform shapes and, again, the same function.
  padded, uniform = pad(small, cfg)
  assert uniform.layer_widths == () and jax.tree.map(np.shape, padded) == jax.tree.map(np.shape, params)
  again = np.asarray(jitted.forward(padded, TOKENS, config=uniform))
  tol.assert_reordered(again, want, "padded logits")


def test_nothing_dead_changes_nothing_and_a_fully_dead_layer_keeps_one_unit():
  params = jax.tree.map(np.array, M.init_params(LLAMA, jax.random.key(2)))
  same, cfg, _ = compact(params, LLAMA)
  assert cfg == LLAMA and jax.tree.map(np.shape, same) == jax.tree.map(np.shape, params)
  params["layers"][0]["mlp"]["down_proj"]["kernel"][:] = 0
  params["layers"][0]["self_attn"]["o_proj"]["kernel"][:] = 0
  small, cfg, _ = compact(params, LLAMA)
  assert cfg.widths(0) == (1, 2, 1) and cfg.widths(1) == (24, 4, 2)


def test_compacted_model_checkpoints_evaluates_in_float32_and_exports_for_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  import transformers

  from jaxprune.io._hf import save_hf_dir

  params = _killed(LLAMA)
  small, cfg, _ = compact(params, LLAMA)
  save_checkpoint(tmp_path / "ck", cfg, small)
  config, loaded, _, _ = read_checkpoint(tmp_path / "ck")
  assert config == cfg and config.layer_widths
  assert jax.tree.map(np.shape, loaded) == jax.tree.map(np.shape, small)
  from jaxprune._evaluate import perplexity

  got = perplexity(loaded, TOKENS, config=config, progress=False).perplexity
  want = perplexity(params, TOKENS, config=LLAMA, progress=False).perplexity
  assert got == pytest.approx(want, rel=tol.LOSS_F32)
  save_hf_dir(tmp_path / "hf", config, loaded)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
  with torch.no_grad():
    theirs = model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
  ours = np.asarray(jitted.forward(params, TOKENS, config=LLAMA))
  tol.assert_reordered(theirs, ours, "transformers logits of the padded export")
