"""LLM Surgeon over a whole model (van der Ouderaa et al. 2024, arXiv:2312.17244): Kronecker-factored curvature of
every linear, one global allocation over all of them, OBS weight updates, over ``T`` shots.

Shot ``i`` of ``T``:

1. **Curvature** (:meth:`Runner.curvature`, one forward and one backward per batch, data-parallel over the mesh):
   per linear ``A = E[a aᵀ]`` ``(d_in, d_in)`` over its inputs and ``G = E[g gᵀ]`` ``(d_out, d_out)`` over the
   loss gradients at its outputs, labels drawn from the model (the true Fisher, default) or the data's. A linear
   with a bias is the weight ``[W b]`` ``(d_out, d_in + 1)`` on the input ``[a; 1]``: ``A`` gains ``E[a]`` and 1.
2. **Costs** of every linear of every block, block by block (damped ``A⁻¹``, ``G⁻¹``): element costs, or row and
   column costs; what earlier shots pruned costs ``-inf``, so it stays pruned. Biases are never pruned.
3. **One global allocation** (:func:`~jaxprune.prune.solvers._surgeon.global_threshold`) over all linears reaching
   ``i·s/T`` of their weights: unstructured, N:M (``⌊i·groups/T⌋`` groups lose ``m - n`` weights; every group at
   ``i = T``), or whole rows and columns (:class:`RowsColumns`, ``r·cols + c·rows − r·c`` weights); or, for
   :class:`~jaxprune.prune._surgeon_units.Units`, whole MLP units and groups of heads reaching ``i·s/T`` of the
   model's parameters (:mod:`jaxprune.prune._surgeon_units`).
4. **OBS updates**, block by block: elements in chunks (``remove_elements``), rows with ``G⁻¹`` and columns with
   ``A⁻¹`` (``remove_rows_columns``). Pruned weights are exactly 0.
5. Optionally (``SurgeonSpec.retrain``, as the reference's ``--lora``): **retraining** of a zero-keeping subset
   (MaskLoRA, ScaleLoRA, norms, ...) on training windows, merged into the weights before the next shot
   (:mod:`jaxprune.prune._surgeon_retrain`); after every shot, the last one included.

Every per-linear function is jitted with the hyper-parameters static, so linears of one shape share one compilation
whatever the depth and the shot. After each shot the state (params and masks) can be saved atomically and a run
resumed from it (:func:`surgeon_prune` with ``out``). Memory: the curvature of all linears at once
(``Σ d_in² + d_out²``: 1.1 GB float32 for SmolLM2-135M, 64 GB for LLaMA-2-7B), on the host after the curvature
pass; one linear's inverses and update at a time on the device; the costs of all linears on the host (one float32
per weight).
"""
from __future__ import annotations

import dataclasses
import numbers
import sys
import time
from collections.abc import Callable
from typing import NamedTuple
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxprune import _tree as tree
from jaxprune.errors import JaxpruneError
from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig
from jaxprune.models._convert import from_hf_layout, to_hf_layout
from jaxprune.prune._patterns import NM, Unstructured, pattern_name
from jaxprune.prune import _surgeon_retrain as R, _surgeon_units as U
from jaxprune.prune._surgeon_retrain import Retraining
from jaxprune.prune._surgeon_units import Units
from jaxprune.prune.solvers import _surgeon as sg
from jaxprune.prune.solvers._base import solver_jit
from jaxprune.runner import Runner

FISHER_LABELS = ("sampled", "data")
ALLOCATIONS = ("global", "layer")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RowsColumns:
  """Structured sparsity: whole output rows and input columns of every linear, ``sparsity`` of all their weights
  (a linear losing ``r`` of ``rows`` rows and ``c`` of ``cols`` columns loses ``r·cols + c·rows − r·c``)."""

  sparsity: float

  def __post_init__(self):
    object.__setattr__(self, "sparsity", Unstructured(self.sparsity).sparsity)  # same check and message


@dataclasses.dataclass(frozen=True)
class SurgeonSpec:
  """What LLM Surgeon does to every linear of a model.

  Attributes:
    pattern: ``Unstructured(s)`` (global, no scope), ``NM(n, m)`` (``n`` kept of every ``m``),
      :class:`RowsColumns` ``(s)`` or :class:`~jaxprune.prune._surgeon_units.Units` ``(s)`` (``s`` of the model's
      parameters, by whole MLP units and groups of heads).
    shots: ``T >= 1``; shot ``i`` prunes to ``i·s/T`` with curvature recomputed on the model pruned so far.
    fisher_labels: ``"sampled"`` from the model (the paper's true Fisher) or the ``"data"``'s next tokens.
    damping_a, damping_g: relative damping of ``A`` and ``G`` (``δ = damping · mean diag``; the reference
      scripts' 0.01 and 0.1).
    chunk: removed weights solved jointly in an element update (the reference's ``max_correlate``, 2000).
    seed: the key of the sampled labels (shot ``i`` uses ``fold_in(key(seed), i)``).
    allocation: ``"global"`` (the paper: one threshold over the costs of all layers decides how much each loses)
      or ``"layer"`` (every linear loses the same fraction, chosen by its own costs, as SparseGPT and Wanda
      allocate; the costs and OBS updates are LLM Surgeon's).
    retrain: a :class:`~jaxprune.prune._surgeon_retrain.Retraining` run after every shot (the last included), or
      None.
  """

  pattern: Unstructured | NM | RowsColumns | Units
  shots: int = 1
  fisher_labels: str = "sampled"
  damping_a: float = 0.01
  damping_g: float = 0.1
  chunk: int = 2000
  seed: int = 0
  allocation: str = "global"
  retrain: Retraining | None = None

  @property
  def kind(self) -> str:
    if isinstance(self.pattern, Units):
      return "units"
    return "rows_columns" if isinstance(self.pattern, RowsColumns) else "element"

  def to_json(self) -> dict:
    return {"method": "surgeon", "pattern": surgeon_pattern_name(self.pattern), "shots": self.shots,
            "fisher_labels": self.fisher_labels, "damping_a": self.damping_a, "damping_g": self.damping_g,
            "chunk": self.chunk, "seed": self.seed, "allocation": self.allocation,
            **({"retrain": self.retrain.to_json()} if self.retrain is not None else {})}


def surgeon_pattern_name(pattern) -> str:
  """``"unstructured:0.5"``, ``"2:4"``, ``"rows_columns:0.2"`` or ``"units:0.2"``."""
  if isinstance(pattern, RowsColumns):
    return f"rows_columns:{pattern.sparsity:g}"
  if isinstance(pattern, Units):
    return f"units:{pattern.sparsity:g}"
  return pattern_name(pattern)


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def check_surgeon_spec(spec: SurgeonSpec) -> SurgeonSpec:
  """``spec`` if every field is valid; else a one-line :class:`JaxpruneError`."""
  if not isinstance(spec, SurgeonSpec):
    raise JaxpruneError(f"spec must be a SurgeonSpec, got {type(spec).__name__}")
  if not isinstance(spec.pattern, (Unstructured, NM, RowsColumns, Units)):
    raise JaxpruneError(f"surgeon pattern must be Unstructured, NM, RowsColumns or Units, got {spec.pattern!r}")
  if isinstance(spec.pattern, Units) and spec.allocation != "global":
    raise JaxpruneError("structured units are allocated by one global threshold; allocation 'layer' does not apply")
  if isinstance(spec.pattern, Unstructured) and spec.pattern.scope is not None:
    raise JaxpruneError("surgeon allocates one threshold over all layers; a ranking scope does not apply")
  if not _is_int(spec.shots) or spec.shots < 1:
    raise JaxpruneError(f"shots must be an integer >= 1, got {spec.shots!r}")
  if spec.allocation not in ALLOCATIONS:
    raise JaxpruneError(f"surgeon allocation must be one of {', '.join(ALLOCATIONS)}, got {spec.allocation!r}")
  if spec.fisher_labels not in FISHER_LABELS:
    raise JaxpruneError(f"fisher labels must be one of {', '.join(FISHER_LABELS)}, got {spec.fisher_labels!r}")
  for name in ("damping_a", "damping_g"):
    value = getattr(spec, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
      raise JaxpruneError(f"surgeon {name} must be a finite number > 0, got {value!r}")
  if not _is_int(spec.chunk) or spec.chunk < 1:
    raise JaxpruneError(f"surgeon chunk must be a positive integer, got {spec.chunk!r}")
  if not _is_int(spec.seed):
    raise JaxpruneError(f"surgeon seed must be an integer, got {spec.seed!r}")
  if spec.retrain is not None:
    return dataclasses.replace(spec, retrain=R.check_retraining(spec.retrain))
  return spec


# ---------------------------------------------------------------- one linear (jitted, one compile per shape)


@solver_jit(static_argnames=("damping_a", "damping_g"))
def linear_inverses(a, g, *, damping_a: float, damping_g: float):
  """Damped ``A⁻¹`` ``(d_in, d_in)`` and ``G⁻¹`` ``(d_out, d_out)`` of one linear, and its dead inputs ``(d_in,)``
  and outputs ``(d_out,)`` (a zero diagonal entry: an input that is always 0, or an output whose gradient is, e.g.
  the keys once every query row is gone). A dead entry's diagonal is set to the mean live one (1 if none lives),
  as SparseGPT does for dead inputs: it decouples, and the relative damping keeps its scale."""
  def revive(m):
    d = jnp.diag(m)
    dead = d <= 0
    alive = jnp.sum(~dead).astype(d.dtype)
    fill = jnp.where(alive > 0, jnp.sum(jnp.where(dead, 0, d)) / jnp.maximum(alive, 1), 1)
    return m + jnp.diag(jnp.where(dead, fill, 0)), dead

  (a, dead_in), (g, dead_out) = revive(a), revive(g)
  return sg.damped_inverse(a, damping=damping_a), sg.damped_inverse(g, damping=damping_g), dead_in, dead_out


@solver_jit(static_argnames=("kind",))
def linear_costs(w, a, g, inverses, *, kind: str):
  """OBS costs of one linear: ``(d_out, d_in)`` element costs, or ``((d_out,) row, (d_in,) column)`` costs.

  ``w`` ``(d_out, d_in)`` (HF layout, a bias as its last column), ``a`` ``(d_in, d_in)``, ``g`` ``(d_out, d_out)``:
  expectations (sums over tokens divided by their count); ``inverses``: :func:`linear_inverses`. Weights of dead
  inputs or outputs cost 0 (the quadratic does not see them; the reference prunes them first too).
  """
  a_inv, g_inv, dead_in, dead_out = inverses
  if kind == "element":
    costs = sg.element_costs(w, jnp.diag(a_inv), jnp.diag(g_inv))
    return jnp.where(dead_out[:, None] | dead_in[None, :], 0, costs)
  rows, cols = sg.row_costs(w, a, g_inv), sg.column_costs(w, g, a_inv)
  return jnp.where(dead_out, 0, rows), jnp.where(dead_in, 0, cols)


@solver_jit(static_argnames=("chunk",))
def update_elements(w, a, g, inverses, keep, *, chunk: int):
  """``(W', ½ tr(ΔWᵀ G ΔW A))``: the chunked correlated OBS update removing ``keep == False`` (``(d_out, d_in)``
  bool) from ``w`` under ``G ⊗ A`` (shapes as :func:`linear_costs`)."""
  a_inv, g_inv, _, _ = inverses
  new = sg.remove_elements(w, a_inv, g_inv, keep, chunk=chunk)
  return new, sg.kron_quadratic(new - w, a, g)


@solver_jit()
def update_rows_columns(w, a, g, inverses, keep_rows, keep_cols):
  """``(W', ½ tr(ΔWᵀ G ΔW A))`` removing rows ``keep_rows == False`` ``(d_out,)`` with ``G⁻¹`` and columns
  ``keep_cols == False`` ``(d_in,)`` with ``A⁻¹``: the joint OBS optimum under ``G ⊗ A``."""
  a_inv, g_inv, _, _ = inverses
  new = sg.remove_rows_columns(w, a_inv, g_inv, keep_rows, keep_cols)
  return new, sg.kron_quadratic(new - w, a, g)


# ---------------------------------------------------------------- the model's linears


@dataclasses.dataclass(frozen=True)
class Linear:
  """One linear of the model: block ``layer``, ``path`` in it, the tap of its input."""

  layer: int
  path: str
  tap: str


def model_linears(config: ModelConfig, params) -> list[Linear]:
  """Every linear of every block, in block order and, within a block, in ``linear_groups`` order."""
  return [Linear(i, path, tap) for i, block in enumerate(params["layers"])
          for tap, paths in M.present_linears(config, block).items() for path in paths]


def _weight(block, path: str) -> np.ndarray:
  """``[W b]`` ``(d_out, d_in (+1))`` float32 HF layout of the linear at ``path``."""
  node = tree.get(block, path)
  w = np.asarray(to_hf_layout(np.asarray(node["kernel"], np.float32)))
  return np.concatenate([w, np.asarray(node["bias"], np.float32)[:, None]], axis=1) if "bias" in node else w


def _set_weight(block, path: str, w: np.ndarray, dtype) -> dict:
  node = dict(tree.get(block, path))
  d_in = node["kernel"].shape[0]
  node["kernel"] = np.asarray(from_hf_layout(w[:, :d_in])).astype(dtype)
  if "bias" in node:
    node["bias"] = w[:, d_in].astype(np.asarray(node["bias"]).dtype)
  return tree.set_at(block, path, node)


def _factors(curvature: dict, lin: Linear, with_bias: bool) -> tuple[np.ndarray, np.ndarray]:
  """``(A, G)`` expectations of one linear from its layer's sums; ``A`` bias-augmented ``[[E aaᵀ, E a], [E aᵀ, 1]]``
  when the linear has a bias."""
  count = np.float32(curvature["count"])
  a = np.asarray(curvature["A"][lin.tap], np.float32) / count
  if with_bias:
    mean = np.asarray(curvature["a"][lin.tap], np.float32) / count
    a = np.block([[a, mean[:, None]], [mean[None, :], np.ones((1, 1), np.float32)]])
  return a, np.asarray(curvature["G"][lin.path], np.float32) / count


# ---------------------------------------------------------------- the pass


@dataclasses.dataclass
class SurgeonState:
  """After ``done`` shots: the params, the keep masks (per block ``{path: (d_in, d_out) bool}``, kernel layout)
  and one report per finished shot."""

  done: int
  params: dict
  masks: list
  reports: list


def _targets(spec: SurgeonSpec, sizes: list[tuple[int, int]], shot: int) -> int:
  """Weights pruned after shot ``shot`` (1-based) of all linears of ``sizes`` ``(d_out, d_in)``."""
  total = sum(r * c for r, c in sizes)
  p = spec.pattern
  if isinstance(p, NM):
    groups = total // p.m
    return groups * shot // spec.shots * p.pruned
  return int(total * p.sparsity * shot / spec.shots) if shot < spec.shots else int(total * p.sparsity)


# Inverses of all linears up to this many bytes are kept on the host from the costs to the updates (1.1 GB for
# SmolLM2-135M); beyond, each linear's are computed again for its update (LLaMA-2-7B: 64 GB).
KEEP_INVERSES_BYTES = 4 << 30


def shot_costs(state: SurgeonState, config: ModelConfig, spec: SurgeonSpec, curvature: list, *,
               progress: bool = True):
  """``(linears, costs, inverses)`` of a shot: host costs of every linear (element ``(d_out, d_in)`` float32,
  ``(rows, columns)``, or for units a :class:`UnitCosts`) with ``-inf`` where earlier shots pruned and a bias
  column dropped; the damped inverses on the host when they fit :data:`KEEP_INVERSES_BYTES` (else ``None``)."""
  linears = model_linears(config, state.params)
  keep_inverses = 4 * sum(curvature[lin.layer]["A"][lin.tap].size + curvature[lin.layer]["G"][lin.path].size
                          for lin in linears) <= KEEP_INVERSES_BYTES
  costs, inverses = [], [] if keep_inverses else None
  for lin in tqdm(linears, desc="costs", unit="linear", disable=not progress, leave=False):
    block = state.params["layers"][lin.layer]
    w = _weight(block, lin.path)
    a, g = _factors(curvature[lin.layer], lin, w.shape[1] > tree.get(block, lin.path)["kernel"].shape[0])
    inv = linear_inverses(a, g, damping_a=spec.damping_a, damping_g=spec.damping_g)
    if keep_inverses:
      inverses.append(jax.device_get(inv))
    keep = np.asarray(to_hf_layout(state.masks[lin.layer][lin.path]))
    d_in = keep.shape[1]
    if spec.kind == "units":
      part = U.part_of(config, lin.layer, lin.path)
      count = U.unit_count(w.shape, part, d_in)
      out = np.asarray(jax.device_get(U.linear_unit_costs(w, a, g, inv, side=part.side, size=part.size,
                                                          count=count)), np.float64)
      costs.append(UnitCosts(part, np.where(U.pruned_units(keep, part), -np.inf, out),
                             U.unit_params(w.shape, part), w.shape, d_in))
      continue
    out = jax.device_get(linear_costs(w, a, g, inv, kind=spec.kind))
    if spec.kind == "element":
      costs.append(np.where(keep, np.asarray(out, np.float32)[:, :d_in], -np.inf))
    else:
      rows, cols = out
      costs.append((np.where(keep.any(axis=1), rows, -np.inf), np.where(keep.any(axis=0), cols[:d_in], -np.inf)))
  return linears, costs, inverses


class UnitCosts(NamedTuple):
  """One linear's part in the units of its layer: ``part``, ``costs`` ``(count,)`` (``-inf``: removed before),
  ``size`` (parameters per unit), HF ``shape`` ``(d_out, d_in (+1))`` and kernel inputs ``d_in``."""

  part: U.Part
  costs: np.ndarray
  size: int
  shape: tuple[int, int]
  d_in: int


def units_budget(spec: SurgeonSpec, total: int, shot: int) -> int:
  """Parameters removed after shot ``shot`` (1-based) of a model of ``total`` parameters."""
  s = spec.pattern.sparsity
  return int(total * s * shot / spec.shots) if shot < spec.shots else int(total * s)


def units_removed(costs: list, allocation) -> int:
  """Parameters removed by a units ``allocation`` over ``costs`` (:class:`UnitCosts` per linear): each linear's
  removed units times its parameters per unit."""
  total = 0
  for c, rows, cols in zip(costs, allocation.keep_rows, allocation.keep_cols):
    flags = rows if c.part.side == "rows" else cols[:c.costs.size * c.part.size]
    total += int((~flags).sum()) // c.part.size * c.size
  return total


def allocate(config: ModelConfig, spec: SurgeonSpec, linears: list[Linear], costs: list, shot: int, *,
             total_params: int | None = None):
  """The allocation of shot ``shot`` (1-based) over ``costs`` (:func:`shot_costs`): ``i·s/T`` of all the linears'
  weights (N:M: ``⌊i·groups/T⌋`` groups), by one global threshold or, with ``spec.allocation == "layer"``, the
  same fraction of each linear by its own threshold. Structured: refuses to remove every head of a layer. Units:
  ``i·s/T`` of ``total_params`` (the model's parameters), by :func:`~jaxprune.prune._surgeon_units.allocate_units`."""
  if spec.kind == "units":
    if total_params is None:
      raise JaxpruneError("structured units need the model's parameter count (total_params)")
    cands = U.candidates(linears, [c.part for c in costs], [c.costs for c in costs], [c.size for c in costs])
    allocation, _ = U.allocate_units(linears, [c.part for c in costs], [c.shape for c in costs],
                                     [c.d_in for c in costs], cands, units_budget(spec, total_params, shot),
                                     spec.pattern.sparsity)
    return allocation
  sizes = [c.shape if spec.kind == "element" else (c[0].size, c[1].size) for c in costs]
  structure = spec.pattern if isinstance(spec.pattern, NM) else spec.kind
  if spec.allocation == "global":
    allocation = sg.global_threshold(costs, sparsity=spec.pattern.sparsity, structure=structure,
                                     budget=_targets(spec, sizes, shot))
  else:
    parts = [sg.global_threshold([c], sparsity=spec.pattern.sparsity, structure=structure,
                                 budget=_targets(spec, [size], shot)) for c, size in zip(costs, sizes)]
    allocation = sg.Allocation(
        tuple(p.masks[0] for p in parts), tuple(p.pruned[0] for p in parts), tuple(p.sparsities[0] for p in parts),
        max(p.threshold for p in parts),
        None if spec.kind == "element" else tuple(p.keep_rows[0] for p in parts),
        None if spec.kind == "element" else tuple(p.keep_cols[0] for p in parts))
  if spec.kind == "rows_columns":
    _check_heads(config, linears, allocation, spec.pattern.sparsity)
  return allocation


def _check_heads(config: ModelConfig, linears, allocation, sparsity: float) -> None:
  """Refuses a structured allocation that leaves a layer's attention without any head: one of its query, key,
  value or output projections loses every weight (all rows or all columns)."""
  groups = M.linear_groups(config)
  attention = set(groups.get("attn_in", ())) | set(groups.get("o_in", ()))
  for lin, keep in zip(linears, allocation.masks):
    if lin.path in attention and not keep.any():
      raise JaxpruneError(f"structured sparsity {sparsity:g} would remove every head of layer {lin.layer} "
                          f"({lin.path} would lose every row or column); use a lower sparsity")


def apply_allocation(state: SurgeonState, spec: SurgeonSpec, curvature: list, linears: list[Linear], allocation,
                     inverses: list | None = None, *, progress: bool = True) -> tuple[list, list, list]:
  """The OBS updates of ``allocation`` on every linear, block by block: ``(layers, masks, per-linear reports)``."""
  layers, masks, reports = list(state.params["layers"]), [dict(m) for m in state.masks], []
  for k, lin in enumerate(tqdm(linears, desc="update", unit="linear", disable=not progress, leave=False)):
    block = layers[lin.layer]
    node = tree.get(block, lin.path)
    d_in = node["kernel"].shape[0]
    w = _weight(block, lin.path)
    a, g = _factors(curvature[lin.layer], lin, w.shape[1] > d_in)
    inv = (inverses[k] if inverses is not None
           else linear_inverses(a, g, damping_a=spec.damping_a, damping_g=spec.damping_g))
    keep = allocation.masks[k]
    extra = np.ones(w.shape[1] - d_in, bool)  # the bias column: never pruned
    if spec.kind == "element":
      new, error = update_elements(w, a, g, inv, np.concatenate([keep, np.broadcast_to(extra, (w.shape[0],
                                   extra.size))], axis=1), chunk=spec.chunk)
    else:
      new, error = update_rows_columns(w, a, g, inv, allocation.keep_rows[k],
                                       np.concatenate([allocation.keep_cols[k], extra]))
    layers[lin.layer] = _set_weight(block, lin.path, np.asarray(new), np.asarray(node["kernel"]).dtype)
    masks[lin.layer][lin.path] = np.asarray(from_hf_layout(keep))
    reports.append({"layer": lin.layer, "name": lin.path, "sparsity": float(1.0 - keep.mean()),
                    "error": float(error)})
  return layers, masks, reports


def surgeon_shot(state: SurgeonState, config: ModelConfig, spec: SurgeonSpec, calib: np.ndarray, runner: Runner, *,
                 progress: bool = True) -> SurgeonState:
  """Shot ``state.done + 1``: curvature, costs, one global allocation, OBS updates (see the module docstring)."""
  shot = state.done + 1
  start = time.perf_counter()
  key = jax.random.fold_in(jax.random.key(spec.seed), shot)
  curvature = runner.curvature(state.params, calib, key=key, sampled=spec.fisher_labels == "sampled",
                               progress=progress)
  curvature_seconds = time.perf_counter() - start
  linears, costs, inverses = shot_costs(state, config, spec, curvature, progress=progress)
  if spec.kind == "units":  # counted in the model's parameters
    total = count_params(state.params)
    allocation = allocate(config, spec, linears, costs, shot, total_params=total)
    target, pruned = units_budget(spec, total, shot), units_removed(costs, allocation)
  else:
    allocation = allocate(config, spec, linears, costs, shot)
    total, pruned = sum(m.size for m in allocation.masks), sum(allocation.pruned)
    target = _targets(spec, [m.shape for m in allocation.masks], shot)
  del costs
  layers, masks, reports = apply_allocation(state, spec, curvature, linears, allocation, inverses,
                                            progress=progress)
  report = {"shot": shot, "target_pruned": target, "pruned": pruned, "sparsity": pruned / total,
            "threshold": allocation.threshold,
            "curvature_seconds": round(curvature_seconds, 3), "seconds": round(time.perf_counter() - start, 3),
            "layers": reports}
  return SurgeonState(shot, {**state.params, "layers": layers}, masks, state.reports + [report])


def initial_state(params, config: ModelConfig) -> SurgeonState:
  """Nothing pruned yet: all-``True`` masks of every linear."""
  masks = [{path: np.ones(tree.get(block, path)["kernel"].shape, bool)
            for paths in M.present_linears(config, block).values() for path in paths} for block in params["layers"]]
  return SurgeonState(0, params, masks, [])


def run_surgeon(params, config: ModelConfig, spec: SurgeonSpec, calib: np.ndarray, *, batch_size: int = 8,
                mesh: Mesh | None = None, state: SurgeonState | None = None,
                on_shot: Callable[[SurgeonState], None] | None = None, progress: bool = True,
                train_windows: np.ndarray | None = None, retrain_dir: Path | None = None) -> SurgeonState:
  """All shots of ``spec`` on ``params`` with calibration windows ``calib`` ``(n, seqlen)`` int32; ``state`` resumes
  after a finished shot, ``on_shot(state)`` is called after each shot and after each retraining (the checkpointing
  hook). With ``spec.retrain``: ``train_windows`` ``(n, seqlen)`` int32 are the retraining data and
  ``retrain_dir`` keeps the train state of a shot's retraining."""
  spec = check_surgeon_spec(spec)
  calib = np.asarray(calib, np.int32)
  if spec.retrain is not None:
    train_windows = R.check_training(params, config, spec.retrain, train_windows, mesh=mesh)
  elif train_windows is not None:
    raise JaxpruneError("training windows given without retraining (spec.retrain)")
  if isinstance(spec.pattern, NM):
    for block in params["layers"]:
      for paths in M.present_linears(config, block).values():
        for path in paths:
          spec.pattern.check_width(tree.get(block, path)["kernel"].shape[0])
  runner = Runner(config, mesh=mesh, batch_size=batch_size)
  state = initial_state(params, config) if state is None else state
  bar = tqdm(total=spec.shots, initial=state.done, desc="surgeon", unit="shot", disable=not progress)
  while state.done < spec.shots or R.pending(state, spec.retrain):
    if R.pending(state, spec.retrain):
      shot_dir = None if retrain_dir is None else Path(retrain_dir) / f"shot{state.done}"
      state = R.retrain_shot(state, config, spec.retrain, train_windows, mesh=mesh, state_dir=shot_dir,
                             progress=progress)
      last = state.reports[-1]["retrain"]
      bar.set_postfix(loss=f"{last['loss_before']:.3f}->{last['loss_after']:.3f}")
    else:
      state = surgeon_shot(state, config, spec, calib, runner, progress=progress)
      last = state.reports[-1]
      bar.set_postfix(sparsity=f"{last['sparsity']:.4f}", seconds=f"{last['seconds']:.1f}")
      bar.update()
    if on_shot is not None:
      on_shot(state)
  bar.close()
  return state


# ---------------------------------------------------------------- the job: resumable, with metadata


class ShotStore:
  """The state after each shot, as a jaxprune checkpoint (Orbax, written atomically) in ``OUT.partial/surgeon``."""

  def __init__(self, out: Path, config: ModelConfig, identity: dict):
    import json

    from jaxprune.prune._resume import partial_dir

    self.dir = partial_dir(out) / "surgeon"
    self.config = config
    self.identity = json.loads(json.dumps(identity, default=str))

  def save(self, state: SurgeonState) -> None:
    from jaxprune.io._checkpoint import save_checkpoint
    from jaxprune.prune._job import mask_tree

    save_checkpoint(self.dir, self.config, state.params, masks=mask_tree(state.masks), overwrite=True,
                    metadata={"identity": self.identity, "done": state.done, "reports": state.reports})

  def load(self, params) -> SurgeonState | None:
    from jaxprune.io._checkpoint import is_checkpoint, read_checkpoint

    if not is_checkpoint(self.dir):
      return None
    _, saved, masks, meta = read_checkpoint(self.dir, with_masks=True)
    if meta.get("identity") != self.identity:
      raise JaxpruneError(f"{self.dir} holds progress of a different run; remove it or use another --out")
    saved = jax.tree.map(np.asarray, saved)
    block_masks = [{k[:-len("/kernel")]: np.asarray(v, bool) for k, v in tree.flatten(m).items()}
                   for m in masks["layers"]]
    return SurgeonState(int(meta["done"]), {**params, **saved}, block_masks, list(meta["reports"]))


def count_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def surgeon_prune(params, calib, *, config: ModelConfig, spec: SurgeonSpec, out: Path | None = None,
                  identity: dict | None = None, batch_size: int = 8, mesh: Mesh | None = None,
                  progress: bool = True, train_windows=None):
  """Prunes ``params`` with LLM Surgeon (see the module docstring); with ``out``, the state after every shot (and
  after every retraining) is kept in ``OUT.partial/surgeon`` and a rerun with the same identity resumes from the
  last finished step. ``train_windows`` ``(n, seqlen)``: the retraining data of ``spec.retrain``, from text
  disjoint from the evaluation (see :mod:`jaxprune.prune._surgeon_retrain`); each shot's report then holds a
  ``retrain`` entry (mean training loss on its windows before and after, seconds).

  Returns a :class:`~jaxprune.prune._job.PruneOutcome` whose metadata holds the spec, per-linear ``layers``
  reports (last shot), ``per_layer_sparsity`` (per block ``{path: fraction}``), one report per shot
  (``shots_report``), the measured ``sparsity`` of the linears and, for :class:`RowsColumns` and units,
  ``params_before`` and ``params_after``.

  Rows and columns: the pruned model is then shrunk (:func:`jaxprune.models._compact.compact`): every MLP unit
  whose ``gate``/``up`` row or ``down`` column was removed, and every group of heads (a KV head and its query
  heads) whose value rows or output-projection columns were all removed, leaves the model, whose config then
  holds per-layer widths (``outcome.config``). ``params_after`` counts the parameters of that smaller model;
  ``params_kept`` counts those outside removed rows and columns (what a format able to drop any row or column
  would keep: removed rows and columns of the hidden size stay in the model as zeros).

  Units (:class:`~jaxprune.prune._surgeon_units.Units`): whole MLP units and groups of heads, ``s`` of the model's
  parameters; every removed unit leaves the model, so ``params_after = params_kept = params_before − removed``.
  """
  from jaxprune.data._windows import as_windows
  from jaxprune.prune._job import PruneOutcome, mask_tree, versions

  spec = check_surgeon_spec(spec)
  if calib is None:
    raise JaxpruneError("surgeon needs calibration windows")
  calib = as_windows(calib, vocab_size=config.vocab_size, max_positions=config.max_position_embeddings,
                     what="calibration windows")
  if spec.retrain is not None:
    from jaxprune.data import tokens_sha256

    train_windows = R.check_training(params, config, spec.retrain, train_windows, mesh=mesh)
    identity = {**(identity or {}), "train_windows_sha256": tokens_sha256(train_windows)}
  store = ShotStore(out, config, {**(identity or {}), **spec.to_json()}) if out is not None else None
  state = store.load(params) if store is not None else None
  if state is not None and progress:
    print(f"resuming after shot {state.done} ({store.dir})", file=sys.stderr, flush=True)
  start = time.perf_counter()
  state = run_surgeon(params, config, spec, calib, batch_size=batch_size, mesh=mesh, state=state,
                      on_shot=store.save if store is not None else None, progress=progress,
                      train_windows=train_windows, retrain_dir=store.dir.with_name("surgeon-retrain")
                      if store is not None else None)
  seconds = time.perf_counter() - start
  final = jax.tree.map(np.asarray, state.params)
  meta = {**spec.to_json(), **_summary(final, state, spec), "versions": versions(), **(identity or {})}
  masks, new_config = mask_tree(state.masks), None
  if spec.kind in ("rows_columns", "units"):
    from jaxprune.models._compact import compact

    final, new_config, masks = compact(final, config, masks)
    meta["params_after"] = count_params(final)
    meta["layer_widths"] = [list(new_config.widths(i)) for i in range(new_config.num_layers)]
  return PruneOutcome(final, masks, meta, seconds, new_config)


def _summary(params, state: SurgeonState, spec: SurgeonSpec) -> dict:
  """Per-linear reports of the last shot, per-layer sparsities, shot reports, measured sparsity, and the
  structured parameter counts."""
  layers = state.reports[-1]["layers"] if state.reports else []
  zeros = total = removed = 0
  for i, block in enumerate(state.masks):
    for path, keep in block.items():
      kernel = np.asarray(tree.get(params["layers"][i], path)["kernel"])
      zeros += int(np.sum(kernel == 0))
      total += kernel.size
      removed += int((~keep).sum())
      if "bias" in tree.get(params["layers"][i], path):
        removed += int((~keep.any(axis=0)).sum())  # biases of whole removed output rows
  out = {"layers": layers, "sparsity": zeros / max(total, 1),
         "per_layer_sparsity": [{path: float(1.0 - keep.mean()) for path, keep in block.items()}
                                for block in state.masks],
         "shots_report": [{k: v for k, v in r.items() if k != "layers"} for r in state.reports]}
  if spec.kind in ("rows_columns", "units"):
    before = count_params(params)
    out.update(params_before=before, params_kept=before - removed)
  return out
