"""Structured LLM Surgeon by coupled units: whole MLP units and whole groups of heads, under one global threshold
over every layer, with a target counted in the model's parameters.

A **unit** is what :func:`jaxprune.models._compact.compact` can take out of a model:

* an MLP unit ``j``: row ``j`` of ``gate_proj`` and ``up_proj`` (OPT: ``fc1``, with its bias) and column ``j`` of
  ``down_proj`` (``fc2``): ``3 · hidden`` parameters (OPT ``2 · hidden + 1``);
* a group of heads ``h`` (GQA-consistent): the ``head_dim`` rows of KV head ``h`` in ``k_proj`` and ``v_proj``,
  the rows of its ``num_heads / num_kv_heads`` query heads in ``q_proj`` (biases with their rows) and the matching
  columns of ``o_proj``.

**Cost** under the Kronecker-factored Fisher (block-diagonal over linears, ``G ⊗ A`` within one): the OBS cost of
zeroing a unit's entries jointly is the sum over its linears of the joint cost of its rows
(:func:`~jaxprune.prune.solvers._surgeon.row_block_costs`, ``½ tr(([G⁻¹]_BB)⁻¹ W_B A W_Bᵀ)``) or columns
(:func:`~jaxprune.prune.solvers._surgeon.column_block_costs`). **Update**: the joint optimum over the removed
rows (``G⁻¹``) and columns (``A⁻¹``) of each linear (``remove_rows_columns``); within ``down_proj`` and
``o_proj`` the kept columns compensate the removed ones through ``A⁻¹`` of their inputs.

**Allocation** (:func:`allocate_units`): the units of all layers in one stable ascending sort of their cost per
parameter (a group of heads holds ``num_heads / num_kv_heads · 2 + 2`` times ``head_dim · hidden`` parameters, an
MLP unit ``3 · hidden``: ranked by cost alone, the large groups would never go first; per parameter, the prefix is
the greedy solution of removing the budget's parameters at the least summed cost), the longest prefix whose
parameters fit the budget (``floor(s · P)``, ``P`` the model's parameters, embeddings included), so the removal is
short of it by less than the next unit. Every layer keeps at least one group of heads
and one MLP unit (a one-line error otherwise). Units removed by an earlier shot cost ``-inf`` and stay removed.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import JaxpruneError
from jaxprune.models._compact import _attn_paths, _mlp_paths
from jaxprune.models._config import ModelConfig
from jaxprune.prune._patterns import Unstructured
from jaxprune.prune.solvers import _surgeon as sg
from jaxprune.prune.solvers._base import solver_jit

KINDS = ("attn", "mlp")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Units:
  """Structured sparsity by whole MLP units and groups of heads: ``sparsity`` of the model's parameters (all of
  them, embeddings included) removed."""

  sparsity: float

  def __post_init__(self):
    object.__setattr__(self, "sparsity", Unstructured(self.sparsity).sparsity)  # same check and message


@dataclasses.dataclass(frozen=True)
class Part:
  """How one linear takes part in its layer's units: ``kind`` (``"attn"``/``"mlp"``), ``side`` (``"rows"`` of
  the output or ``"cols"`` of the input) and ``size`` (rows or columns per unit)."""

  kind: str
  side: str
  size: int


def part_of(config: ModelConfig, layer: int, path: str) -> Part:
  """The :class:`Part` of the linear ``path`` of block ``layer``."""
  _, heads, kv = config.widths(layer)
  ins, out = _mlp_paths(config)
  q, k, v, o = _attn_paths(config)
  per = heads // kv * config.head_dim
  parts = {**{p: Part("mlp", "rows", 1) for p in ins}, out: Part("mlp", "cols", 1),
           q: Part("attn", "rows", per), k: Part("attn", "rows", config.head_dim),
           v: Part("attn", "rows", config.head_dim), o: Part("attn", "cols", per)}
  if path not in parts:
    raise JaxpruneError(f"structured units: linear {path} of layer {layer} is not part of an MLP unit or a head")
  return parts[path]


@solver_jit(static_argnames=("side", "size", "count"))
def linear_unit_costs(w, a, g, inverses, *, side: str, size: int, count: int):
  """``(count,)`` joint OBS costs of removing each unit's rows (``side="rows"``) or columns of one linear (``w``
  ``(d_out, d_in)`` HF layout, a bias as its last column; factors and ``inverses`` as
  :func:`~jaxprune.prune._surgeon_pass.linear_costs`). Dead rows or columns add nothing (as single removals)."""
  a_inv, g_inv, dead_in, dead_out = inverses
  if side == "rows":
    return sg.row_block_costs(jnp.where(dead_out[:, None], 0, w), a, g_inv, size=size)
  return sg.column_block_costs(jnp.where(dead_in[None, :], 0, w), g, a_inv, size=size, count=count)


def unit_count(shape: tuple[int, int], part: Part, d_in: int) -> int:
  """Units of a linear of HF ``shape`` ``(d_out, d_in (+1))`` whose kernel has ``d_in`` inputs."""
  return (shape[0] if part.side == "rows" else d_in) // part.size


def unit_params(shape: tuple[int, int], part: Part) -> int:
  """Parameters one unit removes from a linear of HF ``shape`` ``(d_out, d_in (+1 bias))``: its rows with their
  biases, or its columns."""
  return part.size * (shape[1] if part.side == "rows" else shape[0])


def pruned_units(keep: np.ndarray, part: Part) -> np.ndarray:
  """``(count,)`` bool: units already removed from a linear with HF keep mask ``keep`` ``(d_out, d_in)``."""
  live = keep.any(axis=1) if part.side == "rows" else keep.any(axis=0)
  return ~live.reshape(-1, part.size).any(axis=1)


@dataclasses.dataclass(frozen=True)
class Candidates:
  """Every unit of the model: ``costs``, ``sizes`` (parameters) and ``(layer, kind, index)`` per unit."""

  costs: np.ndarray
  sizes: np.ndarray
  layer: np.ndarray
  kind: np.ndarray
  index: np.ndarray


def candidates(linears, parts: list[Part], part_costs: list[np.ndarray], part_sizes: list[int]) -> Candidates:
  """Sums the parts of each ``(layer, kind)`` unit over its linears: ``parts``, ``part_costs`` ``(count,)`` and
  ``part_sizes`` (parameters per unit) in ``linears`` order. Units are listed by layer, attention first."""
  costs, sizes = {}, {}
  for lin, part, cost, size in zip(linears, parts, part_costs, part_sizes):
    key = (lin.layer, part.kind)
    cost = np.asarray(cost, np.float64)
    if key in costs and costs[key].shape != cost.shape:
      raise JaxpruneError(f"structured units: layer {lin.layer}'s {part.kind} linears disagree on the unit count")
    costs[key] = costs.get(key, 0) + cost
    sizes[key] = sizes.get(key, 0) + size
  keys = sorted(costs, key=lambda k: (k[0], KINDS.index(k[1])))
  return Candidates(np.concatenate([costs[k] for k in keys]),
                    np.concatenate([np.full(costs[k].size, sizes[k], np.int64) for k in keys]),
                    np.concatenate([np.full(costs[k].size, k[0]) for k in keys]),
                    np.concatenate([np.full(costs[k].size, KINDS.index(k[1])) for k in keys]),
                    np.concatenate([np.arange(costs[k].size) for k in keys]))


def choose(c: Candidates, budget: int, sparsity: float) -> tuple[np.ndarray, float]:
  """``(removed (n,) bool, threshold)``: the longest prefix of the stable order of cost per parameter whose
  parameters fit ``budget`` (the threshold: the last one's cost per parameter); a one-line error if a layer would
  lose every group of heads or every MLP unit."""
  if np.isnan(c.costs).any():
    raise JaxpruneError("structured units: a unit cost is NaN (curvature not finite)")
  per_param = c.costs / c.sizes
  order = np.argsort(per_param, kind="stable")
  take = int(np.searchsorted(np.cumsum(c.sizes[order]), budget, side="right"))
  removed = np.zeros(c.costs.size, bool)
  removed[order[:take]] = True
  for layer, kind in sorted({(int(a), int(b)) for a, b in zip(c.layer, c.kind)}):
    here = (c.layer == layer) & (c.kind == kind)
    if removed[here].all():
      what = "group of heads" if KINDS[kind] == "attn" else "MLP unit"
      raise JaxpruneError(f"structured units {sparsity:g} would remove every {what} of layer {layer}; "
                          "use a lower sparsity")
  return removed, float(per_param[order[take - 1]]) if take else -np.inf


def allocate_units(linears, parts: list[Part], shapes: list[tuple[int, int]], d_ins: list[int], c: Candidates,
                   budget: int, sparsity: float) -> tuple[sg.Allocation, int]:
  """``(allocation, parameters removed)``: :func:`choose` spread over the linears as whole rows and columns
  (``keep_rows`` ``(d_out,)``, ``keep_cols`` ``(d_in,)`` without a bias column, ``masks`` their outer product)."""
  removed, threshold = choose(c, budget, sparsity)
  masks, keep_rows, keep_cols = [], [], []
  for lin, part, shape, d_in in zip(linears, parts, shapes, d_ins):
    gone = removed[(c.layer == lin.layer) & (c.kind == KINDS.index(part.kind))]
    flags = np.repeat(~gone, part.size)
    rows = flags if part.side == "rows" else np.ones(shape[0], bool)
    cols = np.ones(d_in, bool)
    if part.side == "cols":
      cols[:flags.size] = flags
    keep_rows.append(rows)
    keep_cols.append(cols)
    masks.append(np.outer(rows, cols))
  pruned = tuple(int((~m).sum()) for m in masks)
  allocation = sg.Allocation(tuple(masks), pruned, tuple(p / m.size for p, m in zip(pruned, masks)), threshold,
                             tuple(keep_rows), tuple(keep_cols))
  return allocation, int(c.sizes[removed].sum())


def magnitude_units(params, config: ModelConfig, units: Units) -> tuple[dict, list, int]:
  """The baseline without curvature: every unit ranked by the root mean square of its weights (its norm over the
  square root of its parameters, so that a group of heads and an MLP unit compare per parameter), the allocation
  of :func:`allocate_units` over ``units.sparsity`` of the model's parameters, removed weights set to 0, no update.

  Returns ``(params, masks, removed)``: masks per block ``{path: (d_in, d_out) bool}`` (kernel layout) and the
  parameters removed.
  """
  from jaxprune import _tree as tree
  from jaxprune.models._convert import from_hf_layout
  from jaxprune.prune import _surgeon_pass as P

  linears = P.model_linears(config, params)
  parts, squares, sizes, shapes, d_ins = [], [], [], [], []
  for lin in linears:
    block = params["layers"][lin.layer]
    w = P._weight(block, lin.path)
    d_in = tree.get(block, lin.path)["kernel"].shape[0]
    part = part_of(config, lin.layer, lin.path)
    count = unit_count(w.shape, part, d_in)
    sq = (w.astype(np.float64) ** 2).sum(axis=1) if part.side == "rows" else (w[:, :count * part.size]
                                                                             .astype(np.float64) ** 2).sum(axis=0)
    parts.append(part)
    squares.append(sq.reshape(count, part.size).sum(axis=1))
    sizes.append(unit_params(w.shape, part))
    shapes.append(w.shape)
    d_ins.append(d_in)
  c = candidates(linears, parts, squares, sizes)
  c = dataclasses.replace(c, costs=np.sqrt(c.costs / c.sizes) * c.sizes)  # ranked by RMS (cost per parameter)
  total = int(sum(np.size(x) for x in jax.tree.leaves(params)))
  allocation, removed = allocate_units(linears, parts, shapes, d_ins, c, int(total * units.sparsity),
                                       units.sparsity)
  layers = list(params["layers"])
  masks = [{} for _ in layers]
  for lin, keep, rows, shape, d_in in zip(linears, allocation.masks, allocation.keep_rows, shapes, d_ins):
    block = layers[lin.layer]
    w = P._weight(block, lin.path)
    full = np.concatenate([keep, np.broadcast_to(rows[:, None], (shape[0], shape[1] - d_in))], axis=1)
    layers[lin.layer] = P._set_weight(block, lin.path, np.where(full, w, 0),
                                      np.asarray(tree.get(block, lin.path)["kernel"]).dtype)
    masks[lin.layer][lin.path] = np.asarray(from_hf_layout(keep))
  return {**params, "layers": layers}, masks, removed
