"""Structural edits: drop whole blocks, or replace sublayers (and recovered blocks) by their adapters.

A block removed without recovery leaves the model: its params, its ``sublayers`` entry and one of
``num_layers`` go, so the result is a genuinely smaller model that saves, reloads and exports like any other
(ShortGPT, Men et al. 2024). A removed sublayer stays a layer with mode ``"skip"``, ``"bias"`` or ``"lowrank"``
in ``config.sublayers`` and only its adapter (if any) in its params. A block removed *with* recovery
(Siddiqui et al. 2024 Sec. 5) becomes a layer with both sublayers removed whose attention slot holds the
adapter of the whole block's update: modes ``(bias|lowrank, skip)``, params ``{"self_attn_adapter": ...}``.
"""
from __future__ import annotations

import json

import jax
import numpy as np

from jaxprune.depth._recovery import Recovery
from jaxprune.depth._stages import check_unit, half_keys, half_modes
from jaxprune.errors import JaxpruneError
from jaxprune.models._config import ModelConfig
from jaxprune.models._layers import ADAPTER_NAMES

def param_count(params) -> int:
  """Number of scalars in ``params``."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def _modes(config: ModelConfig) -> list[tuple[str, str]]:
  return [config.sublayer_modes(i) for i in range(config.num_layers)]


def _sublayers(modes: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
  """``config.sublayers`` for ``modes``: empty when every sublayer is full."""
  return () if all(m == ("full", "full") for m in modes) else tuple(modes)


def remove_blocks(params, config: ModelConfig, layers) -> tuple[dict, ModelConfig]:
  """Drops the blocks ``layers`` from ``params`` and ``config`` (a smaller model; other layers untouched)."""
  gone = set(int(i) for i in layers)
  bad = sorted(i for i in gone if not 0 <= i < config.num_layers)
  if bad:
    raise JaxpruneError(f"cannot remove block {bad[0]}: the model has {config.num_layers} blocks")
  keep = [i for i in range(config.num_layers) if i not in gone]
  modes = _modes(config)
  hf = json.loads(config.hf_config_json)
  if isinstance(hf.get("layer_types"), list) and len(hf["layer_types"]) == config.num_layers:
    hf["layer_types"] = [hf["layer_types"][i] for i in keep]
  new_config = config.replace(num_layers=len(keep), sublayers=_sublayers([modes[i] for i in keep]),
                              layer_widths=tuple(config.widths(i) for i in keep) if config.layer_widths else (),
                              hf_config_json=json.dumps(hf, sort_keys=True))
  return {**params, "layers": [params["layers"][i] for i in keep]}, new_config


def _adapter_rank(config: ModelConfig, recovery: Recovery) -> int:
  """The ``adapter_rank`` of the edited config; one rank serves every lowrank adapter of a model."""
  if recovery.kind != "lowrank":
    return config.adapter_rank
  existing = any("lowrank" in m for m in _modes(config))
  if existing and config.adapter_rank != recovery.rank:
    raise JaxpruneError(f"the model already has rank-{config.adapter_rank} adapters; "
                        f"lowrank:{recovery.rank} would need a second rank")
  return recovery.rank


def replace_units(params, config: ModelConfig, *, unit: str, adapters: dict[int, dict],
                  recovery: Recovery) -> tuple[dict, ModelConfig]:
  """Removes ``unit`` of every layer in ``adapters`` (layer -> adapter params, ``{}`` without recovery).

  Blocks without recovery are dropped (:func:`remove_blocks`); otherwise the sublayer (or, for a block, both)
  switch to ``recovery.mode`` and their params are replaced by the adapter.
  """
  check_unit(unit)
  if unit == "block" and recovery.kind == "none":
    return remove_blocks(params, config, adapters)
  for layer, adapter in adapters.items():
    if not 0 <= layer < config.num_layers:
      raise JaxpruneError(f"cannot remove {unit} {layer}: the model has {config.num_layers} layers")
    if bool(adapter) != (recovery.kind != "none"):
      raise JaxpruneError(f"{unit} {layer}: adapter params do not match recovery {recovery}")
  modes = _modes(config)
  layers = list(params["layers"])
  for layer, adapter in adapters.items():
    old = modes[layer]
    subs = (0, 1) if unit == "block" else ((0,) if unit == "attention" else (1,))
    drop = set().union(*(half_keys(config, half_modes(old, s)) for s in subs))
    block = {k: v for k, v in layers[layer].items() if k not in drop}
    new = list(old)
    for s in subs:
      new[s] = "skip"
    slot = 1 if unit == "mlp" else 0
    new[slot] = recovery.mode
    if adapter:
      block[ADAPTER_NAMES[slot]] = adapter
    modes[layer], layers[layer] = tuple(new), block
  new_config = config.replace(sublayers=_sublayers(modes), adapter_rank=_adapter_rank(config, recovery))
  return {**params, "layers": layers}, new_config
