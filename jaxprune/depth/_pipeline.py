"""Depth pruning end to end: score, remove (one-shot or iterative), recover. The one orchestration module.

One-shot: rank the candidate units once and remove the ``k`` least important (ShortGPT, Men et al. 2024).
Iterative: remove the least important unit, re-score the smaller model, repeat ``k`` times (Siddiqui et al.
2024 Sec. 4 compare both). With recovery, each removed unit is replaced by an adapter fitted on the calibration
activations of the model it is removed from, in layer order, so that later adapters see the stream that the
earlier replacements produce (one forward pass for all of them): in closed form, or trained on the same
activations (``fit="mse"``) or on the calibration LM loss (``fit="lm"``; see :mod:`jaxprune.depth._learned`).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from jax.sharding import Mesh

from jaxprune.depth import _learned as L, _recovery as R
from jaxprune.depth._metrics import SAMPLED, Scores, check_metric, near_count, score
from jaxprune.depth._removal import param_count, replace_units
from jaxprune.depth._stages import Chain, candidates, check_tokens, check_unit, unit_stages
from jaxprune.errors import JaxpruneError
from jaxprune.models._config import ModelConfig
from jaxprune.models._layers import ADAPTER_NAMES
from jaxprune.runner import Runner


@dataclasses.dataclass
class DepthResult:
  """A depth-pruned model and how it was obtained.

  ``removed``: layer indices *of the input model*, in removal order; ``steps``: the :class:`Scores` of each
  scoring round (one for one-shot); ``fit_error``: per removed layer, ``Σ‖y - adapter(x)‖² / Σ‖y‖²`` on the
  calibration tokens (the fraction of the unit's update left unexplained; absent without recovery).
  """

  params: dict
  config: ModelConfig
  unit: str
  metric: str
  recovery: R.Recovery
  removed: list[int]
  steps: list[Scores]
  fit_error: dict[int, float]
  params_before: int
  params_after: int
  seconds: float
  fit_seconds: float

  def to_json(self) -> dict:
    first = self.steps[0].to_json() if self.steps else {"ranking": [], "seconds": 0.0}
    out = {
        "unit": self.unit, "metric": self.metric, "recover": str(self.recovery),
        "removed": [f"{self.unit}.{i}" for i in self.removed], "removed_layers": self.removed,
        "ranking": first["ranking"], "metric_seconds": round(sum(s.seconds for s in self.steps), 3),
        "params_before": self.params_before, "params_after": self.params_after,
        "num_layers": self.config.num_layers, "seconds": round(self.seconds, 3),
        "fit_seconds": round(self.fit_seconds, 3),
    }
    if self.metric in SAMPLED and self.steps:
      out["samples"] = self.steps[0].samples
    if self.metric == "shapley_near" and self.steps:
      out["near"] = self.steps[0].near
    if len(self.steps) > 1:
      out["steps"] = [s.to_json() for s in self.steps]
    if self.recovery.kind == "lowrank":
      out["damp"] = self.recovery.damp
    out.update(self.recovery.to_json())
    if self.fit_error:
      out["fit_error"] = {f"{self.unit}.{k}": round(v, 6) for k, v in self.fit_error.items()}
    return out


def removal_count(config: ModelConfig, unit: str, *, remove: int | None = None,
                  fraction: float | None = None) -> int:
  """Number of ``unit`` s to remove: ``remove``, or ``round(fraction * candidates)``; checked against the model."""
  available = len(candidates(config, check_unit(unit)))
  if (remove is None) == (fraction is None):
    raise JaxpruneError("give exactly one of --remove K and --fraction F")
  if fraction is not None:
    if not 0.0 <= fraction <= 1.0:
      raise JaxpruneError(f"--fraction must lie in [0, 1], got {fraction}")
    remove = int(round(fraction * available))
  if remove < 0:
    raise JaxpruneError(f"cannot remove a negative number of units ({remove})")
  if remove > available:
    raise JaxpruneError(f"cannot remove {remove} {unit} units: the model has only {available}")
  return remove


def check_near(config: ModelConfig, unit: str, *, remove: int, iterative: bool, near: int | None) -> None:
  """One-line error unless every scoring round of ``shapley_near`` has at least 2 candidates and removes fewer
  than their count from each sub-network (the last round of an iterative removal has the fewest)."""
  if remove:
    n = len(candidates(config, unit))
    near_count(n - remove + 1 if iterative else n, near)


def _slot(unit: str) -> int:
  """The sublayer slot that holds a removed unit's adapter: attention (0) for blocks and attention, mlp (1)."""
  return 1 if unit == "mlp" else 0


def fit_adapters(params, config: ModelConfig, tokens, *, unit: str, layers, recovery: R.Recovery,
                 batch_size: int = 8, mesh: Mesh | None = None,
                 seed: int = 0) -> tuple[dict[int, dict], dict[int, float]]:
  """Adapters for removing ``unit`` of ``layers``, fitted in layer order on calibration ``tokens`` ``(n, t)``.

  The stream is carried through the model *with the earlier replacements in place*; at a removed unit its input
  ``x`` and update ``y = unit(x) - x`` give the :class:`~jaxprune.depth._recovery.Moments`, the adapter is fitted
  (``recovery.fit``: in closed form, or trained on ``x`` and ``unit(x)``) and applied. With ``fit="lm"`` the
  adapters are first trained together on the LM loss, then carried through the same pass. ``seed``: the
  learned fits' initialisation and batch order. Returns ``({layer: adapter params}, {layer: relative residual
  Σ‖y - adapter(x)‖² / Σ‖y‖²})``.
  """
  if recovery.kind == "none":
    return {int(i): {} for i in layers}, {}
  R.check_fit(fit=recovery.fit, init=recovery.init, steps=recovery.steps, lr=recovery.lr)
  layers = [int(i) for i in layers]
  opts = dict(batch_size=batch_size, mesh=mesh)
  if recovery.fit != "lm":
    return _walk(params, config, tokens, unit=unit, layers=layers, recovery=recovery, seed=seed, **opts)
  if recovery.init == "closed":
    init, _ = _walk(params, config, tokens, unit=unit, layers=layers, recovery=recovery._replace(fit="closed"),
                    **opts)
  else:
    init = {i: L.zero_adapter(config.hidden_size, recovery, key=_key(seed, i)) for i in layers}
  p, c = replace_units(params, config, unit=unit, adapters=init, recovery=recovery)
  trained, _ = L.train_lm(p, c, check_tokens(tokens), adapters=init, name=ADAPTER_NAMES[_slot(unit)],
                          recovery=recovery, seed=seed, **opts)
  return _walk(params, config, tokens, unit=unit, layers=layers, recovery=recovery, given=trained, **opts)


def _key(seed: int, layer: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), layer)


def _walk(params, config: ModelConfig, tokens, *, unit: str, layers: list[int], recovery: R.Recovery,
          batch_size: int, mesh: Mesh | None, seed: int = 0,
          given: dict[int, dict] | None = None) -> tuple[dict[int, dict], dict[int, float]]:
  """The layer-order pass of :func:`fit_adapters`: at each removed unit, the adapter of ``given``, or one fitted
  by ``recovery.fit`` (closed or mse) on the unit's inputs and outputs."""
  chain = Chain(params, config, tokens, batch_size=batch_size, mesh=mesh)
  ws = [w for _, w in chain]
  hs = [chain.embed(t) for t, _ in chain]
  starts = {unit_stages(unit, i)[0]: i for i in layers}
  modes = (recovery.mode, "skip") if _slot(unit) == 0 else ("skip", recovery.mode)
  runner = None
  if given is None and recovery.fit == "mse":  # the adapter's half-block needs the adapter's rank
    rank = recovery.rank if recovery.kind == "lowrank" else config.adapter_rank
    runner = Runner(config.replace(adapter_rank=rank), mesh=mesh, batch_size=batch_size)
  adapters, errors = {}, {}
  s = 0
  while s < len(chain.stages):
    if s not in starts:
      hs = [chain.run(s, h) for h in hs]
      s += 1
      continue
    layer = starts[s]
    st = unit_stages(unit, layer)
    outs = []
    for h in hs:
      out = h
      for t in st:
        out = chain.run(t, out)
      outs.append(out)
    m = R.moments(hs, [o - h for o, h in zip(outs, hs)], ws)
    if given is not None:
      adapter = given[layer]
    elif recovery.fit == "closed":
      adapter = R.fit(m, recovery)
    else:
      init = (R.fit(m, recovery) if recovery.init == "closed"
              else L.zero_adapter(config.hidden_size, recovery, key=_key(seed, layer)))
      adapter, _ = L.train_mse(runner, hs, outs, ws, init, modes=modes, name=ADAPTER_NAMES[_slot(unit)],
                               recovery=recovery, seed=seed + layer)
    errors[layer] = float(R.residual(m, adapter) / m.sy2)
    adapters[layer] = {k: np.asarray(jax.device_get(v)) for k, v in adapter.items()}
    hs = [R.apply_adapter(adapter, h) for h in hs]
    s = st[-1] + 1
  return adapters, errors


def depth_prune(params, tokens, *, config: ModelConfig, metric: str, unit: str, remove: int,
                iterative: bool = False, recovery: R.Recovery = R.Recovery(), samples: int = 8, seed: int = 0,
                near: int | None = None, batch_size: int = 8, mesh: Mesh | None = None) -> DepthResult:
  """Removes the ``remove`` least important ``unit`` s by ``metric`` (see :mod:`jaxprune.depth._metrics`).

  ``tokens`` ``(n, t)`` are the calibration windows used for scoring and for fitting the recovery; ``samples``,
  ``seed`` and ``near`` go to :func:`~jaxprune.depth.score` (``seed`` also to the learned recovery fits).
  """
  check_metric(metric)
  remove = removal_count(config, unit, remove=remove)
  if recovery.kind == "lowrank" and recovery.rank > config.hidden_size:
    raise JaxpruneError(f"lowrank rank {recovery.rank} is larger than the model width {config.hidden_size}")
  R.check_fit(fit=recovery.fit, init=recovery.init, steps=recovery.steps, lr=recovery.lr)
  if metric == "shapley_near":
    check_near(config, unit, remove=remove, iterative=iterative, near=near)
  start = time.perf_counter()
  before = param_count(params)
  opts = dict(batch_size=batch_size, mesh=mesh)
  origin = list(range(config.num_layers))  # current layer -> layer of the input model
  steps, removed, fit_error, fit_seconds = [], [], {}, 0.0
  rounds = [remove] if not iterative else [1] * remove
  for k in rounds if remove else []:
    scores = score(params, tokens, config=config, metric=metric, unit=unit, samples=samples, seed=seed, near=near,
                   **opts)
    steps.append(dataclasses.replace(scores, layers=tuple(origin[i] for i in scores.layers)))
    chosen = scores.order()[:k]
    t0 = time.perf_counter()
    adapters, errors = fit_adapters(params, config, tokens, unit=unit, layers=chosen, recovery=recovery, seed=seed,
                                    **opts)
    fit_seconds += time.perf_counter() - t0
    params, config = replace_units(params, config, unit=unit, adapters=adapters, recovery=recovery)
    removed += [origin[i] for i in chosen]
    fit_error.update({origin[i]: e for i, e in errors.items()})
    if unit == "block" and recovery.kind == "none":
      origin = [o for i, o in enumerate(origin) if i not in set(chosen)]
  return DepthResult(params, config, unit, metric, recovery, removed, steps, fit_error, before,
                     param_count(params), time.perf_counter() - start, fit_seconds)
