"""Structured shrinking: drop the MLP units and groups of heads that a pruned model no longer uses, and pad them
back with zeros where a format needs uniform widths.

A unit is *dead* when its removal cannot change any output, whatever the input:

* an MLP unit ``j`` (LLaMA: ``down(silu(gate(x)) * up(x))``; OPT: ``fc2(act(fc1(x)))``) whose output row of
  ``down``/``fc2`` is zero (column ``j`` of its input), or whose ``gate``, ``up`` or ``fc1`` row and bias are zero
  (``silu(0) = relu(0) = gelu(0) = 0`` and ``0 · up = 0``);
* a group of heads (one KV head and the query heads that share it; every head in OPT) whose columns of
  ``o_proj``/``out_proj`` are all zero, or whose value rows and value bias are zero (the attention then averages
  zero values).

:func:`compact` removes them, giving each layer its own ``(intermediate_size, num_heads, num_kv_heads)``
(``ModelConfig.layer_widths``); the logits are unchanged (tested against the uncompacted model in float64).
At least one unit and one group stay in every layer. :func:`pad` is the inverse up to the order of units and
heads: it appends zero units and zero groups up to the config's uniform widths, which is how such a model is
written to a Hugging Face directory (per-layer widths are not part of ``LlamaConfig`` or ``OPTConfig``: the
exported files keep the original shapes, exactly computing the compacted model, so the saving is in jaxprune's
checkpoint and computation, not in the exported files).

Kernels are ``(d_in, d_out)`` (Flax layout): an MLP unit is a column of ``gate``/``up``/``fc1`` and a row of
``down``/``fc2``; a head is ``head_dim`` consecutive columns of ``q``/``k``/``v`` and rows of the output projection.
"""
from __future__ import annotations

import numpy as np

from jaxprune import _tree as tree
from jaxprune.models._config import ModelConfig

Params = dict


def _mlp_paths(config: ModelConfig) -> tuple[list[str], str]:
  """Input-side linears (a unit is a column) and the output linear (a unit is a row) of the MLP."""
  return (["fc1"], "fc2") if config.family == "opt" else (["mlp/gate_proj", "mlp/up_proj"], "mlp/down_proj")


def _attn_paths(config: ModelConfig) -> tuple[str, str, str, str]:
  return ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
          "self_attn/out_proj" if config.family == "opt" else "self_attn/o_proj")


def _get(block: dict, path: str) -> dict | None:
  """The linear at ``path`` (a dict with a ``kernel``), or None where the block has none (a removed sublayer)."""
  node = tree.get(block, path)
  return node if isinstance(node, dict) and "kernel" in node else None


def _zero_out(node: dict, groups: int) -> np.ndarray:
  """Per group of output columns: kernel columns and bias all zero."""
  k = np.asarray(node["kernel"])
  dead = ~np.any(k.reshape(k.shape[0], groups, -1) != 0, axis=(0, 2))
  if "bias" in node:
    dead &= ~np.any(np.asarray(node["bias"]).reshape(groups, -1) != 0, axis=1)
  return dead


def _zero_in(node: dict, groups: int) -> np.ndarray:
  """Per group of input rows: kernel rows all zero."""
  k = np.asarray(node["kernel"])
  return ~np.any(k.reshape(groups, -1, k.shape[1]) != 0, axis=(1, 2))


def _keep_at_least_one(dead: np.ndarray) -> np.ndarray:
  if dead.all():
    dead = dead.copy()
    dead[0] = False
  return ~dead


def _take(node: dict, keep: np.ndarray, axis: int, width: int) -> dict:
  """``node`` with the groups of ``width`` entries flagged in ``keep`` kept along the kernel's ``axis`` (1:
  output columns, also the bias; 0: input rows)."""
  idx = (np.flatnonzero(keep)[:, None] * width + np.arange(width)).ravel()
  out = dict(node)
  out["kernel"] = np.take(np.asarray(node["kernel"]), idx, axis=axis)
  if axis == 1 and "bias" in node:
    out["bias"] = np.take(np.asarray(node["bias"]), idx)
  return out


def block_keep(block: dict, config: ModelConfig, layer: int) -> tuple[np.ndarray | None, np.ndarray | None]:
  """``(MLP units kept, KV groups kept)`` of one block (``None`` where the sublayer is absent or replaced)."""
  inter, heads, kv = config.widths(layer)
  ins, out = _mlp_paths(config)
  units = None
  if all(_get(block, p) is not None for p in [*ins, out]):
    dead = _zero_in(_get(block, out), inter)
    for p in ins:
      dead |= _zero_out(_get(block, p), inter)
    units = _keep_at_least_one(dead)
  groups = None
  q, k, v, o = _attn_paths(config)
  if all(_get(block, p) is not None for p in (q, k, v, o)):
    dead = _zero_in(_get(block, o), kv) | _zero_out(_get(block, v), kv)
    groups = _keep_at_least_one(dead)
  return units, groups


def shrink_block(node: dict, config: ModelConfig, layer: int, units, groups) -> dict:
  """Applies :func:`block_keep`'s flags to a block's params (or a tree of the same layout, e.g. its masks)."""
  _, heads, kv = config.widths(layer)
  hd = config.head_dim
  if units is not None and not units.all():
    ins, out = _mlp_paths(config)
    for p in ins:
      node = tree.set_at(node, p, _take(_get(node, p), units, 1, 1))
    node = tree.set_at(node, out, _take(_get(node, out), units, 0, 1))
  if groups is not None and not groups.all():
    q, k, v, o = _attn_paths(config)
    per = heads // kv
    node = tree.set_at(node, q, _take(_get(node, q), groups, 1, per * hd))
    for p in (k, v):
      node = tree.set_at(node, p, _take(_get(node, p), groups, 1, hd))
    node = tree.set_at(node, o, _take(_get(node, o), groups, 0, per * hd))
  return node


def compact(params: Params, config: ModelConfig, masks: dict | None = None):
  """Removes every dead MLP unit and group of heads (see the module docstring).

  Returns ``(params, config, masks)``: the config with ``layer_widths`` (empty again when nothing was removed),
  and ``masks`` (a ``{"layers": [...]}`` tree of kernel masks, or None) shrunk alike.
  """
  layers, mask_layers, widths = [], [], []
  for i, block in enumerate(params["layers"]):
    inter, heads, kv = config.widths(i)
    units, groups = block_keep(block, config, i)
    layers.append(shrink_block(block, config, i, units, groups))
    if masks is not None:
      mask_layers.append(shrink_block(masks["layers"][i], config, i, units, groups))
    kept_kv = kv if groups is None else int(groups.sum())
    widths.append((inter if units is None else int(units.sum()), heads // kv * kept_kv, kept_kv))
  uniform = all(w == (config.intermediate_size, config.num_heads, config.num_kv_heads) for w in widths)
  new_config = config.replace(layer_widths=() if uniform else tuple(widths))
  new_masks = None if masks is None else {**masks, "layers": mask_layers}
  return {**params, "layers": layers}, new_config, new_masks


def _pad(node: dict, extra: int, axis: int) -> dict:
  out = dict(node)
  k = np.asarray(node["kernel"])
  shape = list(k.shape)
  shape[axis] = extra
  out["kernel"] = np.concatenate([k, np.zeros(shape, k.dtype)], axis=axis)
  if axis == 1 and "bias" in node:
    b = np.asarray(node["bias"])
    out["bias"] = np.concatenate([b, np.zeros(extra, b.dtype)])
  return out


def pad(params: Params, config: ModelConfig) -> tuple[Params, ModelConfig]:
  """The model at the config's uniform widths: zero MLP units and zero groups of heads appended to every layer
  that lost some (the same function, see the module docstring). Returns ``(params, config)`` without
  ``layer_widths``."""
  if not config.layer_widths:
    return params, config
  hd = config.head_dim
  ins, out = _mlp_paths(config)
  q, k, v, o = _attn_paths(config)
  layers = []
  for i, block in enumerate(params["layers"]):
    inter, heads, kv = config.widths(i)
    if inter < config.intermediate_size and _get(block, out) is not None:
      extra = config.intermediate_size - inter
      for p in ins:
        block = tree.set_at(block, p, _pad(_get(block, p), extra, 1))
      block = tree.set_at(block, out, _pad(_get(block, out), extra, 0))
    if kv < config.num_kv_heads and _get(block, o) is not None:
      extra_kv = config.num_kv_heads - kv
      per = config.num_heads // config.num_kv_heads
      block = tree.set_at(block, q, _pad(_get(block, q), extra_kv * per * hd, 1))
      for p in (k, v):
        block = tree.set_at(block, p, _pad(_get(block, p), extra_kv * hd, 1))
      block = tree.set_at(block, o, _pad(_get(block, o), extra_kv * per * hd, 0))
    layers.append(block)
  return {**params, "layers": layers}, config.replace(layer_widths=())
