"""``jaxprune_recipe.json``: what was done to an exported model, in one small file beside its weights.

The recipe is built from a checkpoint's metadata (see :mod:`jaxprune.io._checkpoint`) and from the exported
weights themselves (the measured sparsity), so it says what the files hold, not only what was asked for::

  {"format": "jaxprune-recipe/1", "jaxprune_version": "0.1.0",
   "source": "smollm2-135m", "source_dtype": "float32", "dtype": "float32",
   "measured_sparsity": 0.5, "linears": 210,
   "prune": {"method": "wanda", "pattern": "unstructured:0.5", "hparams": {}, "true_sequential": false,
             "targets": null, "ignore": null,
             "calibration": {"data": "wiki", "sha256": "...", "nsamples": 64, "seqlen": 512, "seed": 0}},
   "depth": [...], "eval": {...}}

``prune``, ``depth`` and ``eval`` appear only when the model went through them.
"""
from __future__ import annotations

import importlib.metadata

import numpy as np

from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig

FORMAT = "jaxprune-recipe/1"
_PRUNE_KEYS = ("method", "pattern", "hparams", "true_sequential", "targets", "ignore")
_CALIB_KEYS = {"calib": "data", "calib_sha256": "sha256", "nsamples": "nsamples", "seqlen": "seqlen", "seed": "seed"}


def block_linears(config: ModelConfig, block) -> list[tuple[str, object]]:
  """``(path, kernel (d_in, d_out))`` of every linear present in one block, in order."""
  found = []
  for paths in M.linear_groups(config).values():
    for path in paths:
      node = block
      for part in path.split("/"):
        node = node.get(part) if isinstance(node, dict) else None
      if isinstance(node, dict) and "kernel" in node:
        found.append((path, node["kernel"]))
  return found


def measured_sparsity(config: ModelConfig, params) -> tuple[float, int]:
  """``(fraction of exact zeros over all block linears, number of linears)``, block by block (a streamed model
  holds one block at a time)."""
  zeros = total = count = 0
  layers = params["layers"]
  for i in range(len(layers)):
    for _, kernel in block_linears(config, layers[i]):
      k = np.asarray(kernel)
      zeros += int(np.count_nonzero(k == 0))
      total += k.size
      count += 1
  return zeros / max(total, 1), count


def _version() -> str | None:
  try:
    return importlib.metadata.version("jaxprune")
  except importlib.metadata.PackageNotFoundError:
    return None


def build_recipe(metadata: dict, config: ModelConfig, params, *, dtype: str) -> dict:
  """The recipe of a model with checkpoint ``metadata`` and weights ``params``, exported as ``dtype``."""
  sparsity, linears = measured_sparsity(config, params)
  recipe = {"format": FORMAT, "jaxprune_version": _version(), "source": metadata.get("source", metadata.get("model")),
            "source_dtype": metadata.get("source_dtype"), "dtype": dtype, "measured_sparsity": sparsity,
            "linears": linears}
  if "method" in metadata:
    prune = {k: metadata.get(k) for k in _PRUNE_KEYS}
    if metadata.get("calib") is not None:
      prune["calibration"] = {new: metadata.get(old) for old, new in _CALIB_KEYS.items()}
    prune["sparsity"] = metadata.get("sparsity")
    recipe["prune"] = prune
  if metadata.get("depth"):
    recipe["depth"] = metadata["depth"]
  if metadata.get("eval"):
    recipe["eval"] = metadata["eval"]
  return recipe
