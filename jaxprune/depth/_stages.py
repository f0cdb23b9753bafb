"""A decoder seen as a chain of residual stages, the common ground of every depth-pruning computation.

Each layer ``i`` is two stages: its attention half (stage ``2i``) and its MLP half (stage ``2i + 1``). A half is
the layer's ``Block`` with the other sublayer in mode ``"skip"``, so running the two halves one after the other
is exactly the layer (pre-norm and post-norm alike), and the residual stream between them, ``h_mid``, is
available to the metrics (Siddiqui et al. 2024, "A deeper look at depth pruning of LLMs", Sec. 3: attention and
MLP sublayers are scored and removed separately).

A *unit* is what a metric scores and removal takes out: a whole block (stages ``2i, 2i + 1``), an attention
sublayer (stage ``2i``) or an MLP sublayer (stage ``2i + 1``). Absent stages are the identity.

Stages run through the :class:`~jaxprune.runner.Runner`, whose blocks compile against the config with the
structure edits stripped, so blocks of the same shape and half-modes share one compilation whatever was removed
elsewhere.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxprune.errors import JaxpruneError
from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig
from jaxprune.runner import Runner

UNITS = ("block", "attention", "mlp")


class Stage(NamedTuple):
  """One residual half-layer. ``modes``: the half's ``(attention, mlp)`` modes; ``params``: its block params."""

  layer: int
  sub: int  # 0 = attention, 1 = mlp
  modes: tuple[str, str]
  params: dict

  @property
  def identity(self) -> bool:
    return self.modes == ("skip", "skip")


def check_unit(unit: str) -> str:
  if unit not in UNITS:
    raise JaxpruneError(f"unknown unit {unit!r}; choose one of: {', '.join(UNITS)}")
  return unit


def half_modes(modes: tuple[str, str], sub: int) -> tuple[str, str]:
  """The modes of half ``sub`` (0 attention, 1 mlp) of a layer with sublayer ``modes``."""
  return (modes[0], "skip") if sub == 0 else ("skip", modes[1])


def half_keys(config: ModelConfig, modes: tuple[str, str]) -> frozenset[str]:
  """Top-level param names (``self_attn``, ``input_layernorm``, ``mlp_adapter``, ...) of a half-block."""
  if modes == ("skip", "skip"):
    return frozenset()
  module = M.block_module(config, modes)
  h = jnp.zeros((1, 2, config.hidden_size), jnp.float32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), h, M.context(config, 1, 2)))
  return frozenset(shapes["params"])


def stages(params, config: ModelConfig) -> list[Stage]:
  """The ``2 * num_layers`` stages of ``params``, in order."""
  if len(params["layers"]) != config.num_layers:
    raise JaxpruneError(f"params have {len(params['layers'])} layers, config {config.num_layers}")
  keys = functools.cache(functools.partial(half_keys, config))
  out = []
  for i, block_params in enumerate(params["layers"]):
    for sub in (0, 1):
      modes = half_modes(config.sublayer_modes(i), sub)
      out.append(Stage(i, sub, modes, {k: v for k, v in block_params.items() if k in keys(modes)}))
  return out


def unit_stages(unit: str, layer: int) -> tuple[int, ...]:
  """Stage indices of a unit."""
  return {"block": (2 * layer, 2 * layer + 1), "attention": (2 * layer,), "mlp": (2 * layer + 1,)}[unit]


def candidates(config: ModelConfig, unit: str) -> tuple[int, ...]:
  """Layers whose ``unit`` can still be removed: sublayers in mode ``"full"``; blocks with a full sublayer."""
  check_unit(unit)
  if unit == "block":
    return tuple(i for i in range(config.num_layers) if "full" in config.sublayer_modes(i))
  sub = 0 if unit == "attention" else 1
  return tuple(i for i in range(config.num_layers) if config.sublayer_modes(i)[sub] == "full")


@jax.jit
def similarity(a, b, weights):
  """``(Σ w·cos(a_t, b_t), Σ w·arccos(cos)/π, Σ_windows w·arccos(cos_last)/π)`` of ``a, b`` ``(b, t, d)``: the
  first two over all tokens, the third over the last position of each window only; f32."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  dot = jnp.sum(a * b, axis=-1)
  norms = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
  cos = jnp.clip(dot / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny), -1.0, 1.0)
  angle = jnp.arccos(cos) / jnp.pi
  return jnp.sum(cos * weights[:, None]), jnp.sum(angle * weights[:, None]), jnp.sum(angle[:, -1] * weights)


@jax.jit
def _weighted_sum(losses, weights):
  return jnp.sum(losses * weights)


def check_tokens(tokens) -> np.ndarray:
  """Calibration windows as an ``(n, t)`` int32 array; a one-line error for anything else."""
  tokens = np.asarray(tokens, dtype=np.int32)
  if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
    raise JaxpruneError(f"calibration windows must be a non-empty (n, seqlen >= 2) array, got {tokens.shape}")
  return tokens


class Chain:
  """The stages of one model run by a :class:`~jaxprune.runner.Runner` on calibration windows ``tokens``
  ``(n, t)``: the stream, the loss, the sub-network suffixes. Iterating yields ``(tokens (batch, t) int32,
  weights (batch,) float32)`` on the devices (padding windows weigh 0)."""

  def __init__(self, params, config: ModelConfig, tokens, *, batch_size: int, mesh: Mesh | None):
    self.tokens = check_tokens(tokens)
    self.runner = Runner(config, mesh=mesh, batch_size=batch_size)
    self.batches = self.runner.batches(*self.tokens.shape)
    self.params = self.runner.place(params)
    self.stages = stages(self.params, config)

  def __iter__(self):
    for tokens, weights, _ in self.batches.chunks(self.tokens):
      yield tokens, weights

  def embed(self, tokens):
    return self.runner.embed(self.params, tokens)

  def run(self, s: int, h):
    """Stage ``s`` applied to the stream ``h`` ``(b, t, d)``."""
    stage = self.stages[s]
    if stage.identity:
      return h
    return self.runner.block(stage.params, h, modes=stage.modes)

  def loss(self, h, tokens, weights):
    """``Σ_b weights_b · mean_t NLL_bt`` for the stream ``h`` ``(b, t, d)`` leaving the last block (a scalar)."""
    return _weighted_sum(self.runner.head_losses(self.params, h, tokens), weights)

  def streams(self, h, present=None, start: int = 0, out: list | None = None) -> list:
    """Inputs of stages ``start..`` and the final stream: ``out[s]`` for ``s >= start``, ``out[-1]`` the output.

    ``present[s]`` False makes stage ``s`` the identity; ``out`` (length ``2L + 1``) is updated in place.
    """
    n = len(self.stages)
    out = [None] * (n + 1) if out is None else out
    out[start] = h
    for s in range(start, n):
      out[s + 1] = h = self.run(s, h) if present is None or present[s] else h
    return out

  def suffix(self, h, start: int, present=None):
    """The stream leaving the last stage when ``h`` enters stage ``start``."""
    for s in range(start, len(self.stages)):
      if present is None or present[s]:
        h = self.run(s, h)
    return h
