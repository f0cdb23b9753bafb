"""Hugging Face state dicts <-> jaxprune params. The only place where the weight layout changes.

Hugging Face stores a linear weight as ``(d_out, d_in)``; Flax ``Dense`` kernels are ``(d_in, d_out)``.
:func:`to_hf_layout` / :func:`from_hf_layout` are the single transpose, used by the converters and by the pruning
pass (whose solvers work in the ``(d_out, d_in)`` layout).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np

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
    out[name] = np.ascontiguousarray(to_hf_layout(value)) if path[-1] == "kernel" else value
  return out


def params_from_hf(get: Callable[[str], np.ndarray], names: Mapping[str, object] | set, config: ModelConfig,
                   dtype=np.float32) -> Params:
  """Builds params from a Hugging Face state dict.

  ``get(name)`` returns one tensor ``(d_out, d_in)`` as an array; ``names`` holds the available keys. Shapes are
  checked against the config; missing tensors are named in the error.
  """
  return tree_from_hf(get, names, config, abstract_params(config), dtype=dtype)


def tree_from_hf(get: Callable[[str], np.ndarray], names: Mapping[str, object] | set, config: ModelConfig,
                 abstract, *, prefix: tuple[str, ...] = (), dtype=np.float32):
  """The part ``abstract`` of the params (a ``ShapeDtypeStruct`` tree found at ``prefix`` in the whole params,
  e.g. ``("layers", "3")`` for block 3) from a Hugging Face state dict, as :func:`params_from_hf`."""
  leaves, treedef = jax.tree_util.tree_flatten(abstract)
  paths = [prefix + p for p, _ in tree.items(abstract)]
  missing = [hf_name(config, p) for p in paths if hf_name(config, p) not in names]
  if missing:
    raise JaxpruneError(f"checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
  values = []
  for path, like in zip(paths, leaves):
    value = np.asarray(get(hf_name(config, path)), dtype=dtype)
    if path[-1] == "kernel":
      value = from_hf_layout(value)
    if value.shape != like.shape:
      flip = (lambda shape: shape[::-1]) if path[-1] == "kernel" else (lambda shape: shape)  # report HF layout
      raise JaxpruneError(f"tensor {hf_name(config, path)} has shape {flip(value.shape)}, "
                          f"config expects {flip(like.shape)}")
    values.append(np.ascontiguousarray(value))
  return jax.tree_util.tree_unflatten(treedef, values)
