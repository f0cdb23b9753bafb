"""Qwen3: per-head RMSNorm of queries and keys (``self_attn.q_norm``/``k_norm``), an explicit ``head_dim``.

A tiny random transformers ``Qwen3ForCausalLM`` (head_dim 128, as every Qwen3 has and as transformers' GGUF loader
assumes for qwen3, eight times hidden / heads) loads from a Hugging Face directory and from a GGUF file with
transformers' logits, exports back to a directory transformers loads with the same logits, and a pruning pass
prunes its linears and leaves the q/k norm scales as they were.
"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import jaxprune
from jaxprune import _tree as tree
from jaxprune.errors import JaxpruneError
from jaxprune.io import load_model, save_hf_dir
from jaxprune.models import _model as M
from jaxprune.models._config import from_hf_config, to_hf_config
from jaxprune.retrain import TrainSpec, trainable_mask
from jaxprune.retrain._subsets import get_path, linear_paths

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from test_gguf import write_gguf  # noqa: E402 - llama.cpp's layout, q/k norms and Qwen3's head size included
from test_models import TOL  # noqa: E402 - the model-parity tolerance

# The tolerance of the GGUF tests (test_gguf): jaxprune against transformers' GGUF load of the same file.
GGUF_RTOL = GGUF_ATOL = 1e-4
SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=128, max_position_embeddings=64, rope_theta=50000.0, rms_norm_eps=1e-5)
TOKENS = np.random.default_rng(0).integers(0, 101, (2, 17)).astype(np.int32)
NORMS = ("q_norm", "k_norm")


def _qwen3(**overrides):
  """A tiny random ``Qwen3ForCausalLM`` whose norm scales and biases are perturbed, so that they are tested."""
  torch.manual_seed(0)
  config = transformers.Qwen3Config(**{**SMALL, **overrides})
  config._attn_implementation = "eager"
  model = transformers.Qwen3ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _torch_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


_forward = jax.jit(M.forward, static_argnames=("config",))  # one compilation per architecture, shared by the tests


def _logits(config, params) -> np.ndarray:
  return np.asarray(_forward(params, TOKENS, config=config))


CASES = {"untied": dict(tie_word_embeddings=False), "tied-attention-bias": dict(tie_word_embeddings=True,
                                                                                attention_bias=True)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_directory_loads_and_exports_with_transformers_logits(case, tmp_path):
  model = _qwen3(**CASES[case])
  model.save_pretrained(tmp_path / "in")
  loaded = load_model(str(tmp_path / "in"))
  config, params = loaded.config, loaded.params
  assert config.qk_norm and config.head_dim == 128 and config.tie_word_embeddings == CASES[case]["tie_word_embeddings"]
  assert config.qkv_bias == config.o_bias == CASES[case].get("attention_bias", False)
  attn = params["layers"][1]["self_attn"]
  for norm in NORMS:
    np.testing.assert_array_equal(attn[norm]["scale"], model.state_dict()[f"model.layers.1.self_attn.{norm}.weight"])
  want = _torch_logits(model)
  assert np.abs(_logits(config, params) - want).max() <= TOL

  save_hf_dir(tmp_path / "out", config, params)
  hf = json.loads((tmp_path / "out" / "config.json").read_text())
  assert (hf["model_type"], hf["architectures"], hf["head_dim"]) == ("qwen3", ["Qwen3ForCausalLM"], 128)
  assert hf["attention_bias"] == config.qkv_bias
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  assert type(exported).__name__ == "Qwen3ForCausalLM"
  assert np.abs(_torch_logits(exported) - want).max() <= TOL


def test_config_round_trip_and_what_cannot_be_exported():
  hf = transformers.Qwen3Config(**SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=0).to_dict()
  config = from_hf_config(hf)
  assert config.qk_norm and config.sliding_window == 8 and not config.qkv_bias
  back = to_hf_config(config)
  assert back["model_type"] == "qwen3" and back["attention_bias"] is False and back["sliding_window"] == 8
  assert from_hf_config(back) == config
  llama = from_hf_config(transformers.LlamaConfig(**{k: v for k, v in SMALL.items() if k != "head_dim"}).to_dict())
  assert not llama.qk_norm
  with pytest.raises(JaxpruneError, match="cannot export a llama model with q/k norms"):
    to_hf_config(llama.replace(qk_norm=True))
  with pytest.raises(JaxpruneError, match="cannot export a qwen3 model without q/k norms"):
    to_hf_config(config.replace(qk_norm=False))
  assert to_hf_config(llama.replace(qk_norm=True, hf_config_json="{}"))["model_type"] == "qwen3"




def test_qwen3_gguf_logits_equal_transformers_gguf_load(tmp_path):
  model = _qwen3(tie_word_embeddings=False)
  path = write_gguf(tmp_path / "m.gguf", model, "qwen3")
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
  loaded = load_model(str(path))
  assert loaded.config.qk_norm and loaded.config.head_dim == 128 and not loaded.config.tie_word_embeddings
  assert json.loads(loaded.config.hf_config_json)["model_type"] == "qwen3"
  ours, want = _logits(loaded.config, loaded.params), _torch_logits(theirs)
  np.testing.assert_allclose(ours, want, rtol=GGUF_RTOL, atol=GGUF_ATOL)
  np.testing.assert_allclose(ours, _torch_logits(model), rtol=GGUF_RTOL, atol=GGUF_ATOL)
  # The file's q/k norms are read and computed: without them the same weights are far from transformers.
  assert np.abs(_logits(loaded.config.replace(qk_norm=False), loaded.params) - want).max() > 100 * GGUF_ATOL


def test_gguf_rope_over_part_of_a_head_is_refused_in_one_line(tmp_path):
  path = tmp_path / "m.gguf"
  writer = gguf.GGUFWriter(str(path), "qwen3")
  for add, value in (("add_block_count", 1), ("add_embedding_length", 64), ("add_feed_forward_length", 96),
                     ("add_head_count", 4), ("add_vocab_size", 8), ("add_key_length", 128),
                     ("add_rope_dimension_count", 64)):
    getattr(writer, add)(value)
  writer.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(JaxpruneError, match="RoPE over 64 of each head's 128 dimensions is not supported") as err:
    load_model(str(path))
  assert "\n" not in str(err.value)


def test_wanda_prunes_the_linears_and_leaves_the_qk_norms(tmp_path):
  model = _qwen3(tie_word_embeddings=True)
  model.save_pretrained(tmp_path)
  loaded = load_model(str(tmp_path))
  config, dense = loaded.config, loaded.params
  linears = {path for paths in M.linear_groups(config).values() for path in paths}
  assert set(linear_paths(dense["layers"][0])) == linears  # seven projections, no norm
  norms = trainable_mask(dense, TrainSpec(("norms",)))["layers"][0]["self_attn"]
  assert all(norms[n]["scale"] for n in NORMS) and not norms["q_proj"]["kernel"]

  calib = np.random.default_rng(1).integers(0, 101, (4, 16)).astype(np.int32)
  outcome = jaxprune.prune(params=dense, calib=calib, config=config, progress=False,
                           spec=jaxprune.PruneSpec("wanda", jaxprune.Unstructured(0.5)))
  for i, (before, after) in enumerate(zip(dense["layers"], outcome.params["layers"])):
    assert {"/".join(path[:-1]) for path, _ in tree.items(outcome.masks["layers"][i])} == linears
    for path in linears:
      assert (np.asarray(get_path(after, path)["kernel"]) == 0).mean() == 0.5, f"block {i} {path}"
    for norm in NORMS:
      np.testing.assert_array_equal(after["self_attn"][norm]["scale"], before["self_attn"][norm]["scale"])
