"""Hugging Face in and out: configs written by transformers' ``save_pretrained`` load (metadata keys accepted,
computation-changing ones refused), and exported directories load in transformers 4.x and 5.x with the same
logits, in the dtype asked for, sharded when large, with the generation config and a recipe."""
from __future__ import annotations

import json

import numpy as np
import pytest

import jitted

from jaxprune.cli import main
from jaxprune.errors import JaxpruneError
from jaxprune.io import load_model, save_hf_dir
from jaxprune.models._config import from_hf_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", SMALL),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", SMALL),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SMALL, sliding_window=None)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                                 num_attention_heads=4, max_position_embeddings=64,
                                                 word_embed_proj_dim=16)),
}
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 11)).astype(np.int32)
# transformers 4.46-4.57 rope_config_validation: keys each rope type requires (and none other accepted).
ROPE_KEYS_4X = {"default": {"rope_type"}, "linear": {"rope_type", "factor"},
                "llama3": {"rope_type", "factor", "original_max_position_embeddings", "low_freq_factor",
                           "high_freq_factor"}}


def _save(path, arch: str, dtype=None, **overrides):
  config_cls, model_cls, kwargs = ARCHS[arch]
  torch.manual_seed(0)
  model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**kwargs, **overrides})).eval()
  if dtype is not None:
    model = model.to(dtype)
  model.save_pretrained(path)
  return model


def _torch_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


def _our_logits(loaded) -> np.ndarray:
  return np.asarray(jitted.forward(loaded.params, TOKENS, config=loaded.config))


def run(capsys, *argv):
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def read_rope_as_transformers_4(hf: dict) -> tuple[float, str, dict]:
  """What a transformers 4.x LLaMA-family config takes from ``config.json``: ``rope_theta`` (default 10000) and
  ``rope_scaling`` (``rope_parameters`` is unknown to it), validated as 4.x does."""
  scaling = hf.get("rope_scaling")
  if scaling is None:
    return float(hf.get("rope_theta", 10000.0)), "default", {}
  scaling = dict(scaling)
  rope_type = scaling.pop("type", None) or scaling["rope_type"]
  scaling["rope_type"] = rope_type
  assert set(scaling) == ROPE_KEYS_4X[rope_type], scaling  # 4.x warns about (and ignores) any other key
  return float(hf.get("rope_theta", 10000.0)), rope_type, {k: v for k, v in scaling.items() if k != "rope_type"}


# ------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_directory_saved_by_transformers_loads_with_its_logits(arch, tmp_path):
  model = _save(tmp_path, arch)
  hf = json.loads((tmp_path / "config.json").read_text())
  # What a model fetched from the hub and saved again carries besides what save_pretrained writes.
  hf.update(_name_or_path="org/name", _model_name_or_path="org/name", torch_dtype="float32", use_cache=True)
  (tmp_path / "config.json").write_text(json.dumps(hf))
  loaded = load_model(str(tmp_path))
  np.testing.assert_allclose(_our_logits(loaded), _torch_logits(model), rtol=1e-4, atol=1e-4)
  assert loaded.metadata["source_dtype"] == "float32"
  assert loaded.metadata["generation_config"] == json.loads((tmp_path / "generation_config.json").read_text())


@pytest.mark.parametrize("change, message", [
    ({"layer_types": ["full_attention", "sliding_attention"], "use_sliding_window": True, "sliding_window": 8},
     "mixed full and sliding-window"),
    ({"layer_types": ["full_attention", "chunked_attention"]}, "chunked_attention"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope type 'yarn'"),
    ({"attn_logit_softcapping": 30.0}, "attn_logit_softcapping"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_configs_that_change_the_computation_are_refused(tmp_path, change, message):
  _save(tmp_path, "qwen2")
  hf = json.loads((tmp_path / "config.json").read_text())
  with pytest.raises(JaxpruneError, match=message):
    from_hf_config({**hf, **change})


def test_qwen2_layer_types_all_full_or_all_sliding_are_accepted(tmp_path):
  _save(tmp_path, "qwen2")
  hf = json.loads((tmp_path / "config.json").read_text())
  assert set(hf["layer_types"]) == {"full_attention"}
  assert from_hf_config(hf).sliding_window is None
  sliding = {**hf, "layer_types": ["sliding_attention"] * 2, "use_sliding_window": True, "sliding_window": 8}
  assert from_hf_config(sliding).sliding_window == 8


@pytest.mark.parametrize("key", ["num_attention_heads", "vocab_size", "hidden_size"])
def test_a_config_missing_keys_is_one_line(tmp_path, capsys, key):
  _save(tmp_path / "m", "llama")
  hf = json.loads((tmp_path / "m" / "config.json").read_text())
  del hf[key]
  (tmp_path / "m" / "config.json").write_text(json.dumps(hf))
  code, _, err = run(capsys, "convert", "--model", tmp_path / "m", "--out", tmp_path / "ck")
  assert code == 2 and "Traceback" not in err and f"llama config lacks integer {key}" in err, err


# ------------------------------------------------------------------------------------------ writing


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}])
def test_exported_rope_reads_the_same_in_transformers_4_and_5(tmp_path, scaling):
  rope = {"rope_type": "default", **(scaling or {}), "rope_theta": 500000.0}
  model = _save(tmp_path / "src", "llama", rope_parameters=rope)
  loaded = load_model(str(tmp_path / "src"))
  save_hf_dir(tmp_path / "out", loaded.config, loaded.params)
  hf = json.loads((tmp_path / "out" / "config.json").read_text())
  theta, rope_type, extra = read_rope_as_transformers_4(hf)
  assert (theta, rope_type, extra) == (500000.0, rope["rope_type"],
                                       {k: v for k, v in (scaling or {}).items() if k != "rope_type"})
  assert transformers.AutoConfig.from_pretrained(tmp_path / "out").rope_parameters == rope  # 5.x
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_allclose(_torch_logits(exported), _torch_logits(model), rtol=1e-5, atol=1e-5)


def _umask() -> int:
  import os

  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def test_export_keeps_the_source_dtype_shards_and_carries_the_generation_config(tmp_path, capsys):
  from safetensors import safe_open

  model = _save(tmp_path / "src", "llama", dtype=torch.bfloat16)
  out = tmp_path / "out"
  code, _, err = run(capsys, "export", "--model", tmp_path / "src", "--out", out, "--max-shard-size", "10KB")
  assert code == 0, err
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1 and not (out / "model.safetensors").exists()
  for shard in shards:
    with safe_open(str(out / shard), framework="numpy") as f:
      assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  assert (json.loads((out / "generation_config.json").read_text())
          == json.loads((tmp_path / "src" / "generation_config.json").read_text()))
  exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
  np.testing.assert_array_equal(_torch_logits(exported), _torch_logits(model))  # bf16 weights kept exactly
  recipe = json.loads((out / "jaxprune_recipe.json").read_text())
  assert recipe["source"] == str(tmp_path / "src") and recipe["dtype"] == "bfloat16" and "prune" not in recipe
  code, _, _ = run(capsys, "export", "--model", tmp_path / "src", "--out", tmp_path / "f16", "--dtype", "float16")
  with safe_open(str(tmp_path / "f16" / "model.safetensors"), framework="numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_prune_then_export_records_the_recipe(tmp_path, capsys):
  _save(tmp_path / "src", "llama")
  np.save(tmp_path / "calib.npy", np.random.default_rng(1).integers(0, 64, (4, 16)).astype(np.int32))
  code, _, err = run(capsys, "prune", "--model", tmp_path / "src", "--method", "wanda", "--nm", "2:4", "--calib",
                     tmp_path / "calib.npy", "--nsamples", 4, "--seqlen", 16, "--out", tmp_path / "ck")
  assert code == 0, err
  assert run(capsys, "export", "--model", tmp_path / "ck", "--out", tmp_path / "out")[0] == 0
  recipe = json.loads((tmp_path / "out" / "jaxprune_recipe.json").read_text())
  assert recipe["source"] == str(tmp_path / "src") and recipe["source_dtype"] == "float32"
  assert recipe["measured_sparsity"] == 0.5 and recipe["linears"] == 14
  assert recipe["prune"]["method"] == "wanda" and recipe["prune"]["pattern"] == "2:4"
  assert recipe["prune"]["calibration"]["data"] == str(tmp_path / "calib.npy")
  assert recipe["prune"]["calibration"]["nsamples"] == 4 and recipe["prune"]["sparsity"] == 0.5
  assert (tmp_path / "out" / "generation_config.json").is_file()  # carried through the checkpoint
  for f in (tmp_path / "out").iterdir():
    assert f.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_export_overwrites_only_when_asked_and_only_a_model_directory(tmp_path, capsys):
  _save(tmp_path / "src", "llama")
  out = tmp_path / "out"
  assert run(capsys, "export", "--model", tmp_path / "src", "--out", out)[0] == 0
  code, _, err = run(capsys, "export", "--model", tmp_path / "src", "--out", out)
  assert code == 2 and "pass --overwrite" in err and "loaded" not in err  # refused before loading the model
  assert run(capsys, "export", "--model", tmp_path / "src", "--out", out, "--overwrite")[0] == 0
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  code, _, err = run(capsys, "export", "--model", tmp_path / "src", "--out", tmp_path / "mine", "--overwrite")
  assert code == 2 and "not a Hugging Face model directory" in err
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
