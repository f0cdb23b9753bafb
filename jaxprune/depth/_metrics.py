"""Importance of blocks, attention and MLP sublayers: static (cosine, angular) and adaptive (loss, Shapley).

Every score is *higher = more important*; removal takes the lowest first.

* ``cosine``: block influence ``BI = 1 - E_t[cos(h_in, h_out)]`` on the residual stream entering and leaving the
  unit (ShortGPT, Men et al. 2024; Siddiqui et al. 2024 Sec. 3.1).
* ``angular``: ``E_t[arccos(cos(h_in, h_out)) / π]`` (the angular distance of Gromov et al. 2024, used as a
  per-unit score in Siddiqui et al. 2024).
* ``loss``: leave-one-out, ``L(model without the unit) - L(model)`` on the calibration windows.
* ``shapley``: the Shapley value of the unit in the cooperative game "mean LM loss reduction of a sub-network"
  (Siddiqui et al. 2024 Sec. 3.2), estimated by Monte-Carlo over ``samples`` random permutations:
  ``φ_u = E_π[L(S_π,u) - L(S_π,u ∪ {u})]`` with ``S_π,u`` the units before ``u`` in ``π``. The standard error
  ``std(marginals) / sqrt(samples)`` is reported with the estimate.

Forward passes: cosine and angular for all three unit kinds come from ONE pass. Leave-one-out starts each unit
from the cached stream entering it and runs only the suffix. A permutation adds one unit at a time; only the
stages from the added unit on are re-run. All stages of a shape share one compilation; batches are split over
the ``data`` axis of an optional mesh.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from jax.sharding import Mesh

from jaxprune.depth._stages import Chain, candidates, check_unit, similarity, unit_stages
from jaxprune.errors import JaxpruneError
from jaxprune.models._config import ModelConfig

METRICS = ("cosine", "angular", "loss", "shapley")


@dataclasses.dataclass(frozen=True)
class Scores:
  """Importance of the candidate units of one kind. ``layers``, ``scores`` and ``stderr`` are ``(units,)``."""

  metric: str
  unit: str
  layers: tuple[int, ...]
  scores: np.ndarray
  stderr: np.ndarray | None
  seconds: float
  samples: int = 0

  def order(self) -> list[int]:
    """Layers from least to most important (ties: lower layer first)."""
    return [self.layers[i] for i in np.lexsort((np.asarray(self.layers), self.scores))]

  def to_json(self) -> dict:
    rows = []
    for layer in self.order():
      i = self.layers.index(layer)
      row = {"unit": f"{self.unit}.{layer}", "layer": layer, "score": float(self.scores[i])}
      if self.stderr is not None:
        row["stderr"] = float(self.stderr[i])
      rows.append(row)
    out = {"metric": self.metric, "unit": self.unit, "seconds": round(self.seconds, 3), "ranking": rows}
    if self.metric == "shapley":
      out["samples"] = self.samples
    return out


def check_metric(metric: str) -> str:
  if metric not in METRICS:
    raise JaxpruneError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
  return metric


def similarities(params, tokens, *, config: ModelConfig, batch_size: int = 8,
                 mesh: Mesh | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Mean cosine and angular distance of every unit, from one forward pass over ``tokens`` ``(n, t)``.

  Returns ``{unit: (mean cos (layers,), mean arccos(cos)/π (layers,))}`` for unit in block, attention, mlp:
  block ``i`` compares the stream entering layer ``i`` with the one leaving it, attention ``i`` the stream
  entering with ``h_mid`` (after the attention residual), mlp ``i`` ``h_mid`` with the stream leaving.
  """
  chain = Chain(params, config, tokens, batch_size=batch_size, mesh=mesh)
  layers = config.num_layers
  sums = {u: np.zeros((2, layers), np.float64) for u in ("block", "attention", "mlp")}
  for toks, w in chain:
    h = chain.embed(toks)
    pending = []
    for i in range(layers):
      mid = chain.run(2 * i, h)
      out = chain.run(2 * i + 1, mid)
      pending.append([similarity(a, b, w) for a, b in ((h, out), (h, mid), (mid, out))])
      h = out
    values = np.asarray(jax.device_get(pending), np.float64)  # (layers, 3 units, 2)
    for k, unit in enumerate(("block", "attention", "mlp")):
      sums[unit] += values[:, k, :].T
  count = chain.batches.n * chain.batches.seq
  return {u: (s[0] / count, s[1] / count) for u, s in sums.items()}


def leave_one_out(params, tokens, *, config: ModelConfig, unit: str, layers=None, batch_size: int = 8,
                  mesh: Mesh | None = None) -> np.ndarray:
  """Loss increase ``L(without unit) - L(model)`` of each unit in ``layers`` (default: the candidates).

  One dense pass per batch caches the stream entering every stage; unit ``u`` then runs from the stream
  entering it, skips its stages, and runs the rest. Returns ``(len(layers),)`` float64.
  """
  check_unit(unit)
  layers = candidates(config, unit) if layers is None else tuple(layers)
  chain = Chain(params, config, tokens, batch_size=batch_size, mesh=mesh)
  sums = np.zeros(len(layers) + 1, np.float64)
  for toks, w in chain:
    streams = chain.streams(chain.embed(toks))
    losses = [chain.loss(streams[-1], toks, w)]
    for layer in layers:
      st = unit_stages(unit, layer)
      losses.append(chain.loss(chain.suffix(streams[st[0]], st[-1] + 1), toks, w))
    sums += np.asarray(jax.device_get(losses), np.float64)
  means = sums / chain.batches.n
  return means[1:] - means[0]


def shapley(params, tokens, *, config: ModelConfig, unit: str, samples: int, seed: int = 0, layers=None,
            batch_size: int = 8, mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Monte-Carlo Shapley values of the units in ``layers`` for the loss game, and their standard errors.

  The players are the candidate units; every other stage keeps its current mode. ``samples`` permutations,
  each evaluated on all of ``tokens`` ``(n, t)``: the empty coalition, then one unit added at a time (only the
  stages from that unit on are re-run). Returns ``(φ, stderr)``, each ``(len(layers),)`` float64;
  ``stderr`` is NaN for ``samples == 1``.
  """
  check_unit(unit)
  if samples < 1:
    raise JaxpruneError(f"shapley needs at least 1 permutation sample, got {samples}")
  layers = candidates(config, unit) if layers is None else tuple(layers)
  perms = [np.random.default_rng([seed, k]).permutation(len(layers)) for k in range(samples)]
  chain = Chain(params, config, tokens, batch_size=batch_size, mesh=mesh)
  totals = np.zeros((samples, len(layers) + 1), np.float64)  # loss after adding the first k units of perm
  for toks, w in chain:
    h0 = chain.embed(toks)
    for k, perm in enumerate(perms):
      totals[k] += _permutation_losses(chain, h0, toks, w, unit, [layers[j] for j in perm])
  totals /= chain.batches.n
  marginals = np.zeros((samples, len(layers)), np.float64)
  for k, perm in enumerate(perms):
    marginals[k, perm] = totals[k, :-1] - totals[k, 1:]
  stderr = marginals.std(axis=0, ddof=1) / np.sqrt(samples) if samples > 1 else np.full(len(layers), np.nan)
  return marginals.mean(axis=0), stderr


def _permutation_losses(chain: Chain, h0, toks, w, unit: str, order: list[int]) -> np.ndarray:
  """Losses ``(len(order) + 1,)`` of the coalitions ∅, {order[0]}, {order[0], order[1]}, ... on one batch."""
  present = [True] * len(chain.stages)
  for layer in order:
    for s in unit_stages(unit, layer):
      present[s] = False
  streams = chain.streams(h0, present)
  losses = [chain.loss(streams[-1], toks, w)]
  for layer in order:
    st = unit_stages(unit, layer)
    for s in st:
      present[s] = True
    chain.streams(streams[st[0]], present, start=st[0], out=streams)
    losses.append(chain.loss(streams[-1], toks, w))
  return np.asarray(jax.device_get(losses), np.float64)


def score(params, tokens, *, config: ModelConfig, metric: str, unit: str, samples: int = 8, seed: int = 0,
          batch_size: int = 8, mesh: Mesh | None = None) -> Scores:
  """Importance of every candidate ``unit`` of the model by ``metric`` on calibration ``tokens`` ``(n, t)``."""
  check_metric(metric)
  check_unit(unit)
  layers = candidates(config, unit)
  if not layers:
    raise JaxpruneError(f"the model has no {unit} units left to score")
  start = time.perf_counter()
  stderr = None
  opts = dict(config=config, batch_size=batch_size, mesh=mesh)
  if metric in ("cosine", "angular"):
    cos, ang = similarities(params, tokens, **opts)[unit]
    values = (1.0 - cos) if metric == "cosine" else ang
    values = values[list(layers)]
  elif metric == "loss":
    values = leave_one_out(params, tokens, unit=unit, layers=layers, **opts)
  else:
    values, stderr = shapley(params, tokens, unit=unit, samples=samples, seed=seed, layers=layers, **opts)
  return Scores(metric, unit, layers, np.asarray(values, np.float64), stderr, time.perf_counter() - start,
                samples if metric == "shapley" else 0)
