"""Importance of blocks, attention and MLP sublayers: static (cosine, angular) and adaptive (loss, Shapley).

Every score is *higher = more important*; removal takes the lowest first.

* ``cosine``: block influence ``BI = 1 - E_t[cos(h_in, h_out)]`` on the residual stream entering and leaving the
  unit (ShortGPT, Men et al. 2024; Siddiqui et al. 2024 Sec. 3.1).
* ``angular``: ``E_t[arccos(cos(h_in, h_out)) / π]`` (the angular distance of Gromov et al. 2024, used as a
  per-unit score in Siddiqui et al. 2024).
* ``angular_last``: the same at the last position of each window only, ``E_windows[arccos(cos(h_in, h_out)) / π]``
  at ``t = seqlen - 1``: the last-token angular distance of Gromov et al. 2024 ("The Unreasonable Ineffectiveness
  of the Deeper Layers"), whose last token has seen the whole window.
* ``loss``: leave-one-out, ``L(model without the unit) - L(model)`` on the calibration windows.
* ``shapley``: the Shapley value of the unit in the cooperative game "mean LM loss reduction of a sub-network"
  (Siddiqui et al. 2024 Sec. 3.2), estimated by Monte-Carlo over ``samples`` random permutations:
  ``φ_u = E_π[L(S_π,u) - L(S_π,u ∪ {u})]`` with ``S_π,u`` the units before ``u`` in ``π``. The standard error
  ``std(marginals) / sqrt(samples)`` is reported with the estimate.
* ``shapley_near``: the Shapley estimate of Siddiqui et al. 2024 (github shoaibahmed/llm_depth_pruning,
  ``compute_mmlu_loss_shapley``) from sub-networks *near the full model*: each sampled sub-network drops ``k``
  of the ``n`` candidate units (default ``k = n - floor(0.9 n)``: the seed's sub-networks of 90 % of the units),
  and ``φ_u = mean L(S: u ∉ S) - mean L(S: u ∈ S)``, the mean loss of the sampled sub-networks without ``u``
  minus that of those with it (the seed's ``present - absent``, negated so that higher = more important). It is
  not the Shapley value of the whole game: only coalitions of size ``n - k`` take part. Sampling: each of the
  ``samples`` rounds cuts a random permutation of the units into ``ceil(n / k)`` groups of ``k`` (the last
  filled up with random other units), and each group is the removed set of one sub-network, so every unit is
  absent at least once per round (the units drawn to fill up the last group twice) and every sub-network is a
  uniform draw of ``n - k`` units. The standard error
  ``sqrt(var_absent / n_absent + var_present / n_present)`` treats the sub-networks as independent draws.

Forward passes: cosine and both angular distances for all three unit kinds come from ONE pass. Leave-one-out
starts each unit from the cached stream entering it and runs only the suffix; so does each near-full sub-network,
from its first removed stage. A permutation adds one unit at a time; only the stages from the added unit on are
re-run. All stages of a shape share one compilation; batches are split over the ``data`` axis of an optional mesh.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from jaxprune.depth._stages import Chain, candidates, check_unit, similarity, unit_stages
from jaxprune.errors import JaxpruneError
from jaxprune.models._config import ModelConfig

METRICS = ("cosine", "angular", "angular_last", "loss", "shapley", "shapley_near")
SAMPLED = ("shapley", "shapley_near")  # the metrics that draw ``samples`` permutations with ``seed``


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
  near: int = 0  # shapley_near: units removed from each sampled sub-network

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
    if self.metric in SAMPLED:
      out["samples"] = self.samples
    if self.metric == "shapley_near":
      out["near"] = self.near
    return out


def check_metric(metric: str) -> str:
  if metric not in METRICS:
    raise JaxpruneError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
  return metric


class Similarity(NamedTuple):
  """Per layer ``(layers,)`` float64: mean cosine similarity and mean angular distance ``arccos(cos)/π`` over all
  tokens, and the angular distance at the last position of each window, averaged over windows."""

  cos: np.ndarray
  angular: np.ndarray
  angular_last: np.ndarray


def similarities(params, tokens, *, config: ModelConfig, batch_size: int = 8,
                 mesh: Mesh | None = None) -> dict[str, Similarity]:
  """Cosine and angular distances of every unit, from one forward pass over ``tokens`` ``(n, t)``.

  Returns ``{unit: Similarity}`` for unit in block, attention, mlp: block ``i`` compares the stream entering
  layer ``i`` with the one leaving it, attention ``i`` the stream entering with ``h_mid`` (after the attention
  residual), mlp ``i`` ``h_mid`` with the stream leaving.
  """
  chain = Chain(params, config, tokens, batch_size=batch_size, mesh=mesh)
  layers = config.num_layers
  sums = {u: np.zeros((3, layers), np.float64) for u in ("block", "attention", "mlp")}
  for toks, w in chain:
    h = chain.embed(toks)
    pending = []
    for i in range(layers):
      mid = chain.run(2 * i, h)
      out = chain.run(2 * i + 1, mid)
      pending.append([similarity(a, b, w) for a, b in ((h, out), (h, mid), (mid, out))])
      h = out
    values = np.asarray(jax.device_get(pending), np.float64)  # (layers, 3 units, 3 sums)
    for k, unit in enumerate(("block", "attention", "mlp")):
      sums[unit] += values[:, k, :].T
  tokens_, windows = chain.batches.n * chain.batches.seq, chain.batches.n
  return {u: Similarity(s[0] / tokens_, s[1] / tokens_, s[2] / windows) for u, s in sums.items()}


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


def near_count(n: int, near: int | None = None) -> int:
  """Units removed from each sub-network of ``shapley_near`` among ``n`` candidates: ``near``, by default the
  seed's ``n - floor(0.9 n)``; checked to lie in ``[1, n - 1]`` (one-line error otherwise)."""
  if n < 2:
    raise JaxpruneError(f"shapley_near needs at least 2 candidate units, the model has {n}")
  k = n - math.floor(0.9 * n) if near is None else near
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n - 1:
    raise JaxpruneError(f"shapley_near removes between 1 and {n - 1} of the {n} units per sub-network, got {near!r}")
  return int(k)


def coalitions(n: int, k: int, samples: int, seed: int = 0) -> np.ndarray:
  """The sub-networks of ``shapley_near``: ``(samples · ceil(n / k), n)`` bool, ``True`` = unit present.

  Round ``r`` cuts ``default_rng([seed, r]).permutation(n)`` into groups of ``k``; a short last group is filled
  up with units drawn without replacement from the others. Each row removes exactly ``k`` units, every unit is
  removed in one row per round (the fill-up units in two), and each row is a uniformly random ``(n - k)``-subset:
  the short group is a uniform ``m``-subset (``m = n mod k``), the fill-up a uniform ``(k - m)``-subset of the
  others.
  """
  rows = []
  for r in range(samples):
    rng = np.random.default_rng([seed, r])
    perm = rng.permutation(n)
    for lo in range(0, n, k):
      gone = perm[lo:lo + k]
      if len(gone) < k:
        gone = np.concatenate([gone, rng.choice(perm[:lo], k - len(gone), replace=False)])
      row = np.ones(n, bool)
      row[gone] = False
      rows.append(row)
  return np.array(rows, bool).reshape(-1, n)


def contrast(present: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(φ, stderr)`` of ``shapley_near`` from sub-networks ``present`` ``(m, n)`` bool and their losses ``(m,)``:
  ``φ_u = mean L[~present[:, u]] - mean L[present[:, u]]``, ``stderr_u = sqrt(var_a / m_a + var_p / m_p)``
  (sample variances; NaN where a side has fewer than 2 sub-networks)."""
  losses = np.asarray(losses, np.float64)
  phi, se = np.zeros(present.shape[1]), np.zeros(present.shape[1])
  for u in range(present.shape[1]):
    absent, there = losses[~present[:, u]], losses[present[:, u]]
    phi[u] = absent.mean() - there.mean()
    if min(len(absent), len(there)) < 2:
      se[u] = np.nan
    else:
      se[u] = math.sqrt(absent.var(ddof=1) / len(absent) + there.var(ddof=1) / len(there))
  return phi, se


def shapley_near(params, tokens, *, config: ModelConfig, unit: str, samples: int, near: int | None = None,
                 seed: int = 0, layers=None, batch_size: int = 8,
                 mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Shapley estimates from sub-networks near the full model (see the module docstring), and standard errors.

  The players are the units of ``layers`` (default: the candidates); every other stage keeps its current mode.
  ``samples`` rounds of :func:`coalitions`, each sub-network evaluated on all of ``tokens`` ``(n, t)``: from the
  cached dense stream entering its first removed stage, once per distinct sub-network. Returns ``(φ, stderr)``,
  each ``(len(layers),)`` float64.
  """
  check_unit(unit)
  if samples < 1:
    raise JaxpruneError(f"shapley_near needs at least 1 round of sub-networks, got {samples}")
  layers = candidates(config, unit) if layers is None else tuple(layers)
  k = near_count(len(layers), near)
  present = coalitions(len(layers), k, samples, seed)
  distinct, index = np.unique(present, axis=0, return_inverse=True)
  chain = Chain(params, config, tokens, batch_size=batch_size, mesh=mesh)
  sums = np.zeros(len(distinct), np.float64)
  for toks, w in chain:
    streams = chain.streams(chain.embed(toks))
    losses = []
    for row in distinct:
      on = [True] * len(chain.stages)
      for j in np.flatnonzero(~row):
        for s in unit_stages(unit, layers[j]):
          on[s] = False
      first = on.index(False)
      losses.append(chain.loss(chain.suffix(streams[first], first, on), toks, w))
    sums += np.asarray(jax.device_get(losses), np.float64)
  return contrast(present, (sums / chain.batches.n)[index.reshape(-1)])


def score(params, tokens, *, config: ModelConfig, metric: str, unit: str, samples: int = 8, seed: int = 0,
          near: int | None = None, batch_size: int = 8, mesh: Mesh | None = None) -> Scores:
  """Importance of every candidate ``unit`` of the model by ``metric`` on calibration ``tokens`` ``(n, t)``.

  ``samples`` and ``seed``: permutations of ``shapley``, rounds of ``shapley_near``; ``near``: units removed per
  ``shapley_near`` sub-network (default: see :func:`near_count`).
  """
  check_metric(metric)
  check_unit(unit)
  layers = candidates(config, unit)
  if not layers:
    raise JaxpruneError(f"the model has no {unit} units left to score")
  start = time.perf_counter()
  stderr, k = None, 0
  opts = dict(config=config, batch_size=batch_size, mesh=mesh)
  if metric in ("cosine", "angular", "angular_last"):
    sim = similarities(params, tokens, **opts)[unit]
    values = {"cosine": 1.0 - sim.cos, "angular": sim.angular, "angular_last": sim.angular_last}[metric]
    values = values[list(layers)]
  elif metric == "loss":
    values = leave_one_out(params, tokens, unit=unit, layers=layers, **opts)
  elif metric == "shapley":
    values, stderr = shapley(params, tokens, unit=unit, samples=samples, seed=seed, layers=layers, **opts)
  else:
    k = near_count(len(layers), near)
    values, stderr = shapley_near(params, tokens, unit=unit, samples=samples, near=k, seed=seed, layers=layers,
                                  **opts)
  return Scores(metric, unit, layers, np.asarray(values, np.float64), stderr, time.perf_counter() - start,
                samples if metric in SAMPLED else 0, k)
