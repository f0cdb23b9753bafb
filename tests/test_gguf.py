"""GGUF files of the LLaMA family (llama; Mistral, written by llama.cpp as llama; qwen2), written here with
``gguf.GGUFWriter`` from tiny random transformers models: jaxprune's logits equal transformers' GGUF load of the
same file (qwen3: tests/test_qwen3.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import jitted

from jaxprune.errors import JaxpruneError
from jaxprune.io import load_model, save_hf_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rope_theta=50000.0)
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 13)).astype(np.int32)
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's rotary row permutation of q/k (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, arch: str, *, name: str | None = None, matrix_type=np.float32):
  """``model`` (a transformers causal LM) as a GGUF file of architecture ``arch``, as llama.cpp lays it out."""
  c = model.config
  writer = gguf.GGUFWriter(str(path), arch)
  if name is not None:
    writer.add_name(name)
  writer.add_context_length(c.max_position_embeddings)
  writer.add_block_count(c.num_hidden_layers)
  writer.add_embedding_length(c.hidden_size)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_head_count(c.num_attention_heads)
  writer.add_head_count_kv(c.num_key_value_heads)
  writer.add_layer_norm_rms_eps(c.rms_norm_eps)
  writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
  if arch == "qwen3":  # llama.cpp writes Qwen3's head size (not hidden / heads) as the key and value lengths
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
  else:
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
  writer.add_vocab_size(c.vocab_size)
  for key, value in model.state_dict().items():
    if key == "lm_head.weight" and c.tie_word_embeddings:  # the state dict lists the shared tensor twice
      continue
    value = value.float().numpy()
    if key.startswith("model.layers."):
      _, _, layer, rest = key.split(".", 3)
      module, kind = rest.rsplit(".", 1)
      gguf_name = f"blk.{layer}.{_LAYER[module]}.{kind}"
      if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
        value = _permute(value, c.num_attention_heads if module.endswith("q_proj") else c.num_key_value_heads)
    else:
      gguf_name = _GLOBAL[key]
    writer.add_tensor(gguf_name, np.ascontiguousarray(value, matrix_type if value.ndim == 2 else np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def _hf_model(config_cls: str, model_cls: str, **overrides):
  torch.manual_seed(0)
  config = getattr(transformers, config_cls)(**{**SMALL, **overrides})
  return getattr(transformers, model_cls)(config).eval()


def _logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


CASES = {  # name -> (config class, model class, overrides, GGUF architecture, general.name, model_type read)
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True), "llama", None, "llama"),
    "mistral-as-llama": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None),
                         "llama", "Mistral Tiny", "mistral"),
    "qwen2-untied-biases": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False), "qwen2", None,
                            "qwen2"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_logits_equal_transformers_gguf_load(case, tmp_path):
  config_cls, model_cls, overrides, arch, name, model_type = CASES[case]
  model = _hf_model(config_cls, model_cls, **overrides)
  path = write_gguf(tmp_path / "m.gguf", model, arch, name=name)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
  loaded = load_model(str(path))
  ours = np.asarray(jitted.forward(loaded.params, TOKENS, config=loaded.config))
  np.testing.assert_allclose(ours, _logits(theirs), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours, _logits(model), rtol=1e-4, atol=1e-4)
  assert json.loads(loaded.config.hf_config_json)["model_type"] == model_type
  assert loaded.config.tie_word_embeddings == overrides["tie_word_embeddings"]
  assert loaded.metadata["source_dtype"] == "float32"


def test_qwen2_gguf_in_float16_exports_to_a_qwen2_directory(tmp_path):
  model = _hf_model("Qwen2Config", "Qwen2ForCausalLM", tie_word_embeddings=False)
  path = write_gguf(tmp_path / "m.gguf", model, "qwen2", matrix_type=np.float16)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
  loaded = load_model(str(path))
  assert loaded.metadata["source_dtype"] == "float16"
  save_hf_dir(tmp_path / "hf", loaded.config, loaded.params, dtype="float32")
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  assert type(exported).__name__ == "Qwen2ForCausalLM"
  np.testing.assert_allclose(_logits(exported), _logits(theirs), rtol=1e-4, atol=1e-4)


def test_gguf_missing_a_required_field_is_one_line(tmp_path):
  path = tmp_path / "m.gguf"
  writer = gguf.GGUFWriter(str(path), "qwen2")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(JaxpruneError, match="lacks field qwen2.attention.head_count"):
    load_model(str(path))
