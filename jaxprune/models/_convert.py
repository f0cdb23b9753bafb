"""Hugging Face state dicts <-> jaxprune params. The only place where the weight layout changes.

Hugging Face stores a linear weight as ``(d_out, d_in)``; Flax ``Dense`` kernels are ``(d_in, d_out)``.
:func:`to_hf_layout` / :func:`from_hf_layout` are the single transpose, used by the converters and by the pruning
pass (whose solvers work in the ``(d_out, d_in)`` layout).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np

from jaxprune._memory import host_empty
from jaxprune.errors import JaxpruneError
from jaxprune import _tree as tree
from jaxprune.models._config import ModelConfig
from jaxprune.models._model import Params, abstract_params

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def to_hf_layout(kernel):
  """Flax kernel ``(d_in, d_out)`` -> Hugging Face weight ``(d_out, d_in)`` (works on NumPy and JAX arrays)."""
  return kernel.T


def from_hf_layout(weight):
  """Hugging Face weight ``(d_out, d_in)`` -> Flax kernel ``(d_in, d_out)``."""
  return weight.T


TRANSPOSE_TILE = 256  # rows and columns per tile of transposed


def transposed(matrix: np.ndarray, dtype=None) -> np.ndarray:
  """``matrix.T`` (2-D, NumPy) as a new C-contiguous array in ``dtype`` (default: its own), in a
  :func:`~jaxprune._memory.host_buffer`: what converting a layout costs on the host.

  Copied in square tiles of :data:`TRANSPOSE_TILE` (NumPy's copy of a transposed view reads one of the two arrays
  with a stride of a whole row). Reading a LLaMA-2-7B block (0.4 GB of bfloat16, from the page cache) into the
  kernel layout this way, through one read buffer, took 0.96-1.02 s against 2.24-2.63 s with new NumPy buffers
  and ``np.ascontiguousarray`` of the transposed view (2-core VM, 2026-12-04;
  ``experiments/scale/fresh_memory.py``)."""
  rows, cols = matrix.shape
  out = host_empty((cols, rows), matrix.dtype if dtype is None else dtype)
  for i in range(0, rows, TRANSPOSE_TILE):
    for j in range(0, cols, TRANSPOSE_TILE):
      out[j:j + TRANSPOSE_TILE, i:i + TRANSPOSE_TILE] = matrix[i:i + TRANSPOSE_TILE, j:j + TRANSPOSE_TILE].T
  return out


def hf_name(config: ModelConfig, path: tuple[str, ...]) -> str | None:
  """Hugging Face state-dict key of the param at ``path`` (e.g. ``("layers", "3", "mlp", "up_proj", "kernel")``).

  Returns None for params that Hugging Face models do not have (recovery adapters).
  """
  *mods, leaf = path
  if any(m.endswith("_adapter") for m in mods):
    return None
  prefix = "model." if config.family == "llama" else "model.decoder."
  if mods[-1] == "lm_head":
    return "lm_head.weight"
  if mods[0] == "layers":
    mods = ["layers", mods[1], *mods[2:]]
  else:
    mods = mods[1:]  # drop the "embed"/"head" stage name
  return prefix + ".".join(mods) + "." + _LEAF_NAMES[leaf]


def params_to_hf(params: Params, config: ModelConfig) -> dict[str, np.ndarray]:
  """Hugging Face state dict (NumPy arrays, ``(d_out, d_in)`` linears) of ``params``."""
  out = {}
  for path, leaf in tree.items(params):
    name = hf_name(config, path)
    if name is None:
      continue
    value = np.asarray(leaf)
    out[name] = transposed(value) if path[-1] == "kernel" else value
  return out


def params_from_hf(get: Callable[[str], np.ndarray], names: Mapping[str, object] | set, config: ModelConfig,
                   dtype=np.float32) -> Params:
  """Builds params from a Hugging Face state dict.

  ``get(name)`` returns one tensor ``(d_out, d_in)`` as an array; ``names`` holds the available keys. Shapes are
  checked against the config; missing tensors are named in the error.
  """
  return tree_from_hf(get, names, config, abstract_params(config), dtype=dtype)


def tree_from_hf(get: Callable[[str], np.ndarray], names: Mapping[str, object] | set, config: ModelConfig,
                 abstract, *, prefix: tuple[str, ...] = (), dtype=np.float32,
                 get_transient: Callable[[str], np.ndarray] | None = None):
  """The part ``abstract`` of the params (a ``ShapeDtypeStruct`` tree found at ``prefix`` in the whole params,
  e.g. ``("layers", "3")`` for block 3) from a Hugging Face state dict, as :func:`params_from_hf`.

  ``get_transient(name)``: as ``get``, but the array it returns may be overwritten by its next call (a reused read
  buffer); used for the linear weights, which are copied out in the kernel layout (:func:`transposed`)."""
  leaves, treedef = jax.tree_util.tree_flatten(abstract)
  paths = [prefix + p for p, _ in tree.items(abstract)]
  missing = [hf_name(config, p) for p in paths if hf_name(config, p) not in names]
  if missing:
    raise JaxpruneError(f"checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
  values = []
  for path, like in zip(paths, leaves):
    kernel = path[-1] == "kernel"
    value = np.asarray((get_transient if kernel and get_transient else get)(hf_name(config, path)))
    expected = like.shape[::-1] if kernel else like.shape  # the shapes in the Hugging Face layout
    if value.shape != expected:
      raise JaxpruneError(f"tensor {hf_name(config, path)} has shape {value.shape}, config expects {expected}")
    values.append(transposed(value, dtype) if kernel else np.ascontiguousarray(value, dtype=dtype))
  return jax.tree_util.tree_unflatten(treedef, values)
