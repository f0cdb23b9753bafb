"""Hugging Face model directories (safetensors or PyTorch ``.bin``) in, and out again."""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxprune._memory import retained_memory
from jaxprune.errors import JaxpruneError
from jaxprune.io._atomic import atomic_dir
from jaxprune.io._hub import hub_unavailable
from jaxprune.io._stream import (SafetensorsFiles, is_streamed, materialize, prefetch, split, streamed_params,
                                 write_safetensors)
from jaxprune.models._compact import pad
from jaxprune.models._config import ModelConfig, from_hf_config, to_hf_config
from jaxprune.models._convert import params_from_hf, params_to_hf
from jaxprune.models._model import Params

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_TENSOR_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "torch.float32": "float32",
                  "torch.bfloat16": "bfloat16", "torch.float16": "float16"}
GENERATION_CONFIG = "generation_config.json"


def is_hf_dir(path: Path) -> bool:
  return (path / "config.json").is_file()


def _read_json(path: Path, what: str) -> dict:
  try:
    value = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise JaxpruneError(f"{path} is not a readable JSON {what}: {str(err).splitlines()[0]}") from None
  if not isinstance(value, dict):
    raise JaxpruneError(f"{path} is not a JSON {what}: expected an object, got {type(value).__name__}")
  return value


def read_hf_config(path: Path) -> dict:
  return _read_json(path / "config.json", "config")


def read_generation_config(path: Path) -> dict | None:
  """The ``generation_config.json`` of a Hugging Face directory, or None when it has none."""
  file = path / GENERATION_CONFIG
  return _read_json(file, "generation config") if file.is_file() else None


def _unreadable(file: Path, err: Exception) -> JaxpruneError:
  first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
  return JaxpruneError(f"{file} is not a readable weight file (truncated or damaged?): {first}")


def _safetensors_source(shards: list[Path]):
  from safetensors import safe_open

  where, dtypes = {}, {}
  for file in shards:
    try:
      handle = safe_open(str(file), framework="numpy")
      for name in handle.keys():
        where[name] = (file, handle)
        dtypes[name] = handle.get_slice(name).get_dtype()
    except Exception as err:  # noqa: BLE001 - SafetensorError and OSError: a damaged file
      raise _unreadable(file, err) from None

  def get(name: str) -> np.ndarray:
    file, handle = where[name]
    try:
      return np.asarray(handle.get_tensor(name), dtype=np.float32)
    except Exception as err:  # noqa: BLE001
      raise _unreadable(file, err) from None

  return get, dtypes


def _torch_source(path: Path, bins: list[Path]):
  try:
    import torch
  except ImportError:
    raise JaxpruneError(f"{path} holds PyTorch .bin weights; reading them needs torch (pip install torch)") from None
  state = {}
  for file in bins:
    try:
      state.update(torch.load(file, map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001 - pickle, zip and runtime errors alike
      raise _unreadable(file, err) from None
  return (lambda name: state[name].float().numpy()), {k: str(v.dtype) for k, v in state.items()}


def _tensor_source(path: Path):
  """``(get(name) -> float32 array, {name: stored dtype})`` over the weight files of a Hugging Face directory."""
  shards = sorted(path.glob("*.safetensors"))
  if shards:
    return _safetensors_source(shards)
  bins = sorted(path.glob("pytorch_model*.bin"))
  if bins:
    return _torch_source(path, bins)
  raise JaxpruneError(f"{path} has a config.json but no *.safetensors or pytorch_model*.bin weights")


def stored_dtype(dtypes: dict[str, str], hf_config: dict | None = None) -> str:
  """The float dtype most of the weights are stored in (``float32``, ``bfloat16`` or ``float16``); else the
  config's ``dtype``/``torch_dtype``; else ``float32``."""
  counts: dict[str, int] = {}
  for value in dtypes.values():
    if value in _TENSOR_DTYPES:
      counts[_TENSOR_DTYPES[value]] = counts.get(_TENSOR_DTYPES[value], 0) + 1
  if counts:
    return max(sorted(counts), key=counts.__getitem__)
  declared = (hf_config or {}).get("dtype") or (hf_config or {}).get("torch_dtype")
  return declared if declared in FLOAT_DTYPES else "float32"


def load_hf_dir(path: Path, dtype=None) -> tuple[ModelConfig, Params]:
  """Config and params of a Hugging Face causal-LM directory (``dtype``: see :func:`read_hf_dir`)."""
  config, params, _ = read_hf_dir(path, dtype)
  return config, params


def read_hf_dir(path: Path, dtype=None, *, stream: bool = False) -> tuple[ModelConfig, Params, dict]:
  """Config, params, and where they came from (``source_dtype``, ``generation_config``) of a Hugging Face
  causal-LM directory; the params in ``dtype``, by default the dtype most weights are stored in.

  ``stream``: the decoder blocks are a :class:`~jaxprune.io._stream.Blocks`, read from the safetensors files by
  byte range when used, and so are the embeddings and the head."""
  path = Path(path)
  hf_config = read_hf_config(path)
  config = from_hf_config(hf_config)
  if stream:
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
      raise JaxpruneError(f"{path}: streaming reads safetensors weights, and there are none (convert the model, "
                          "or load it without streaming)")
    files = SafetensorsFiles(shards)
    get, dtypes, where = files.get, files.dtypes, files.where
    build = functools.partial(streamed_params, source=path, where=where, get_transient=files.get_transient)
  else:
    get, dtypes = _tensor_source(path)
    build = params_from_hf
  if config.tie_word_embeddings is False and "lm_head.weight" not in dtypes:
    raise JaxpruneError(f"{path}: untied model without lm_head.weight")
  provenance = {"source_dtype": stored_dtype(dtypes, hf_config)}
  params = build(get, set(dtypes), config, jnp.dtype(dtype or provenance["source_dtype"]))
  generation = read_generation_config(path)
  if generation is not None:
    provenance["generation_config"] = generation
  return config, params, provenance


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


DEFAULT_SHARD_SIZE = "5GB"
RECIPE_FILE = "jaxprune_recipe.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
  """Bytes of a size such as ``"5GB"`` (10^9, as transformers counts), ``"500MiB"`` or ``1000000``."""
  if isinstance(text, int) and not isinstance(text, bool):
    value, unit = text, ""
  else:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if match is None or match.group(2).upper() not in _UNITS:
      raise JaxpruneError(f"size must look like 5GB, 500MB or 2GiB, got {text!r}")
    value, unit = float(match.group(1)), match.group(2).upper()
  size = int(value * _UNITS[unit])
  if size <= 0:
    raise JaxpruneError(f"size must be positive, got {text!r}")
  return size


def check_export_dtype(dtype: str) -> str:
  if dtype not in FLOAT_DTYPES:
    raise JaxpruneError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
  return dtype


def check_hf_out(out: Path, overwrite: bool) -> None:
  """Refuses an output that exists, unless ``overwrite`` and it is an empty directory or a Hugging Face model
  directory (anything else is never deleted)."""
  out = Path(out)
  if not out.exists() or (out.is_dir() and not any(out.iterdir())):
    return
  if not out.is_dir():
    raise JaxpruneError(f"output {out} exists and is not a directory")
  if not overwrite:
    raise JaxpruneError(f"output directory {out} exists and is not empty; pass --overwrite to replace it")
  if not is_hf_dir(out):
    raise JaxpruneError(f"output directory {out} is not a Hugging Face model directory (no config.json); "
                        "not replacing it")


def _shards(tensors: dict[str, tuple[tuple[int, ...], int]], max_bytes: int) -> list[list[str]]:
  """Tensor names packed greedily, in order, into shards of at most ``max_bytes`` (a larger tensor alone)."""
  shards: list[list[str]] = [[]]
  size = 0
  for name, (shape, itemsize) in tensors.items():
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  return shards


def _as(value, target: np.dtype) -> np.ndarray:
  """``value`` as a NumPy array of ``target`` (converted through float32 unless it is in ``target`` already)."""
  value = np.asarray(value)
  return value if value.dtype == target else np.asarray(value, np.float32).astype(target)


def _write_blocks(out: Path, params: Params, config: ModelConfig, dtype: str) -> None:
  """The weights of a streamed model, one ``model-*-of-*.safetensors`` file for the embeddings and head and one
  per block (each block read, converted, written and dropped in turn), and ``model.safetensors.index.json``."""
  target = np.dtype(jnp.dtype(dtype))
  layers = params["layers"]
  parts = [lambda: params_to_hf(split(params)[0], config)]  # the embeddings and head, read (if lazy) when written
  parts += [lambda i=i: params_to_hf({"layers": {str(i): layers[i]}}, config) for i in range(len(layers))]
  weight_map, total = {}, 0
  for k, part in enumerate(parts):
    file = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
    prefetch(layers, k)  # block k (part k + 1) is read while this part is converted and written
    state = part()
    if config.tie_word_embeddings:
      state.pop("lm_head.weight", None)
    tensors = {name: _as(v, target) for name, v in state.items()}
    del state
    write_safetensors(out / file, tensors, {"format": "pt"})
    total += sum(t.nbytes for t in tensors.values())
    weight_map.update(dict.fromkeys(tensors, file))
    del tensors
  index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
  (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_weights(out: Path, state: dict[str, np.ndarray], dtype: str, max_bytes: int) -> None:
  """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``."""
  target = np.dtype(jnp.dtype(dtype))
  shards = _shards({k: (v.shape, target.itemsize) for k, v in state.items()}, max_bytes)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map, total = {}, 0
  for file, shard in zip(names, shards):
    tensors = {k: _as(state[k], target) for k in shard}
    write_safetensors(out / file, tensors, {"format": "pt"})
    total += sum(t.nbytes for t in tensors.values())
    weight_map.update(dict.fromkeys(shard, file))
  if len(shards) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@retained_memory()
def save_hf_dir(out: Path, config: ModelConfig, params: Params, tokenizer=None, *, dtype: str = "float32",
                max_shard_size: str | int = DEFAULT_SHARD_SIZE, generation_config: dict | None = None,
                recipe: dict | None = None, overwrite: bool = False) -> Path:
  """Writes a Hugging Face model directory atomically (temporary directory + rename).

  Args:
    out: the directory; if it exists and is not empty, ``overwrite`` is needed and it must be a Hugging Face
      model directory.
    config, params: the model; a structurally pruned one (``config.layer_widths``) is written at the uniform
      widths, the removed MLP units and heads as zeros (:func:`jaxprune.models._compact.pad`), which computes
      the same function.
    tokenizer: a Hugging Face tokenizer to save beside it, or None.
    dtype: ``float32``, ``bfloat16`` or ``float16``: the stored weights and the config's ``dtype``.
    max_shard_size: above it the weights go to several ``model-*-of-*.safetensors`` files with an index.
    generation_config: written as ``generation_config.json`` when given.
    recipe: written as ``jaxprune_recipe.json`` when given (what was done to the model).
  """
  out = Path(out)
  check_export_dtype(dtype)
  max_bytes = parse_size(max_shard_size)
  check_hf_out(out, overwrite)
  if is_streamed(params) and config.layer_widths:
    params = materialize(params)  # padding needs every block's widths at once
  params, config = pad(params, config)  # per-layer widths: zero units and heads back to the uniform shapes
  hf_config = to_hf_config(config)
  hf_config.pop("torch_dtype", None)  # transformers 5 warns about it; 4.x falls back to the weights' dtype
  hf_config["dtype"] = dtype
  with atomic_dir(out, replace=True) as tmp:
    if is_streamed(params):
      _write_blocks(tmp, params, config, dtype)
    else:
      state = params_to_hf(params, config)
      if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
      _write_weights(tmp, state, dtype, max_bytes)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    if generation_config is not None:
      (tmp / GENERATION_CONFIG).write_text(json.dumps(generation_config, indent=2, sort_keys=True))
    if recipe is not None:
      (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=1, sort_keys=True, default=str))
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
  return out
