"""Hugging Face model directories (safetensors or PyTorch ``.bin``) in, and out again."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxprune.errors import JaxpruneError
from jaxprune.io._atomic import atomic_dir
from jaxprune.io._hub import hub_unavailable
from jaxprune.models._config import ModelConfig, from_hf_config, to_hf_config
from jaxprune.models._convert import params_from_hf, params_to_hf
from jaxprune.models._model import Params

def is_hf_dir(path: Path) -> bool:
  return (path / "config.json").is_file()


def read_hf_config(path: Path) -> dict:
  try:
    return json.loads((path / "config.json").read_text())
  except (OSError, json.JSONDecodeError) as err:
    raise JaxpruneError(f"{path / 'config.json'} is not a readable JSON config: {err}") from None


def _tensor_source(path: Path):
  """``(get(name) -> np.ndarray, names)`` over the weight files of a Hugging Face directory."""
  shards = sorted(path.glob("*.safetensors"))
  if shards:
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="flax") for f in shards]
    where = {name: h for h in handles for name in h.keys()}
    return (lambda name: np.asarray(where[name].get_tensor(name), dtype=np.float32)), set(where)
  bins = sorted(path.glob("pytorch_model*.bin"))
  if bins:
    try:
      import torch
    except ImportError:
      raise JaxpruneError(f"{path} holds PyTorch .bin weights; reading them needs torch (pip install torch)") from None
    state = {}
    for f in bins:
      state.update(torch.load(f, map_location="cpu", weights_only=True))
    return (lambda name: state[name].float().numpy()), set(state)
  raise JaxpruneError(f"{path} has a config.json but no *.safetensors or pytorch_model*.bin weights")


def load_hf_dir(path: Path, dtype=np.float32) -> tuple[ModelConfig, Params]:
  """Config and params of a Hugging Face causal-LM directory."""
  config = from_hf_config(read_hf_config(path))
  get, names = _tensor_source(path)
  if config.tie_word_embeddings is False and "lm_head.weight" not in names:
    raise JaxpruneError(f"{path}: untied model without lm_head.weight")
  return config, params_from_hf(get, names, config, dtype)


HUB_PATTERNS = ("*.json", "*.model", "*.txt")


def _has_weights(path: Path) -> bool:
  return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))


def cached_hub_model(name: str) -> Path | None:
  """The snapshot of hub model ``name`` in the local Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``), if one with
  a config and weights is there; no network access."""
  from huggingface_hub import snapshot_download

  try:
    path = Path(snapshot_download(name, local_files_only=True))
  except Exception:  # noqa: BLE001 - not cached, incomplete, or an invalid name: all mean "not usable"
    return None
  return path if is_hf_dir(path) and _has_weights(path) else None


def download_hub_model(name: str) -> Path:
  """Config, weights and tokenizer of hub model ``name``: from the Hugging Face cache when the hub cannot be used
  (``HF_HUB_OFFLINE``, unreachable ``HF_ENDPOINT``), else downloaded (into the same cache)."""
  reason = hub_unavailable()
  if reason is not None:
    cached = cached_hub_model(name)
    if cached is None:
      raise JaxpruneError(f"model {name!r} needs the Hugging Face hub but {reason}, and it is not in the local "
                          "Hugging Face cache; pass a local model directory, a .gguf file, or smollm2-135m")
    return cached
  from huggingface_hub import list_repo_files, snapshot_download

  try:
    files = list_repo_files(name)
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "pytorch_model*.bin"
    return Path(snapshot_download(name, allow_patterns=[*HUB_PATTERNS, weights]))
  except Exception as err:  # hub errors come in many types; the user needs one line
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise JaxpruneError(f"could not download {name!r} from the Hugging Face hub: {first}") from None


def save_hf_dir(out: Path, config: ModelConfig, params: Params, tokenizer=None) -> Path:
  """Writes ``config.json``, ``model.safetensors`` and the tokenizer, atomically (temporary dir + rename)."""
  from safetensors.numpy import save_file

  out = Path(out)
  if out.exists() and any(out.iterdir()):
    raise JaxpruneError(f"output directory {out} exists and is not empty")
  with atomic_dir(out) as tmp:
    hf_config = to_hf_config(config)
    state = params_to_hf(params, config)
    if config.tie_word_embeddings:
      state.pop("lm_head.weight", None)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
  return out
