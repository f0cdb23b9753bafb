"""Recovery of a removed unit: an additive bias or a low-rank linear adapter fitted on calibration activations.

Siddiqui et al. 2024 ("A deeper look at depth pruning of LLMs", Sec. 5) replace a removed block or sublayer by
a learned **mean update** or a **low-rank linear map** of its input. With ``x`` the residual stream entering the
unit and ``y = unit(x) - x`` its residual update, both ``(tokens, d)``:

* bias: ``b = mean(y)`` (the least-squares constant);
* lowrank:R: ``y ≈ x W + b`` with ``rank W <= R``, minimising ``Σ‖y - xW - b‖² + λ‖W‖_F²``. With centred
  ``X, Y``, the ridge map ``W_λ = (XᵀX + λI)⁻¹ XᵀY`` is projected on the top-``R`` eigenvectors ``V_R`` of
  ``W_λᵀ (XᵀX + λI) W_λ`` (reduced-rank ridge regression, Mukherjee & Zhu 2011): ``W = W_λ V_R V_Rᵀ``, stored as
  ``down = W_λ V_R`` ``(d, R)``, ``up = V_Rᵀ`` ``(R, d)``, and ``b = ȳ - x̄ W``. For ``λ = 0`` its error is the
  Eckart-Young optimum ``‖Y - Ŷ‖² + Σ_{i>R} σ_i(Ŷ)²`` with ``Ŷ`` the least-squares fit. ``λ = damp · mean
  diag(XᵀX)``.

These are the closed-form fits (``fit="closed"``). ``fit="mse"`` trains the same adapters to emulate the unit's
update and ``fit="lm"`` trains them on the language-modelling loss (:mod:`jaxprune.depth._learned`).

Statistics and solvers run in float32 with ``precision=HIGHEST``; second moments are centred in a second pass
over the (held) activations, which avoids the cancellation of ``Σxxᵀ - n x̄x̄ᵀ`` on residual streams with
large means.
"""
from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxprune.errors import JaxpruneError
from jaxprune.models._layers import Adapter

_HIGHEST = jax.lax.Precision.HIGHEST
KINDS = ("none", "bias", "lowrank")
FITS = ("closed", "mse", "lm")
INITS = ("zero", "closed")


class Recovery(NamedTuple):
  """What replaces a removed unit and how it is fitted.

  ``kind`` none (skip), bias or lowrank; ``rank`` for lowrank; ridge ``damp`` of the closed-form lowrank fit.
  ``fit``: ``closed`` (the closed forms of this module), ``mse`` (AdamW on the mean squared error between the
  adapter's and the unit's update, unit by unit) or ``lm`` (AdamW on the calibration LM loss, all adapters
  together); see :mod:`jaxprune.depth._learned`. The learned fits start from ``init`` (``zero``: the adapter
  outputs 0, i.e. the skip; ``closed``: the closed-form fit) and take ``steps`` updates at peak learning rate
  ``lr``.
  """

  kind: str = "none"
  rank: int = 0
  damp: float = 1e-2
  fit: str = "closed"
  init: str = "zero"
  steps: int = 200
  lr: float = 1e-2

  @property
  def mode(self) -> str:
    """The sublayer mode of a replaced unit (see ``ModelConfig.sublayers``)."""
    return "skip" if self.kind == "none" else self.kind

  def __str__(self) -> str:
    return f"lowrank:{self.rank}" if self.kind == "lowrank" else self.kind

  @property
  def learned(self) -> bool:
    return self.kind != "none" and self.fit != "closed"

  def to_json(self) -> dict:
    """How the adapters were fitted, for a result record (empty for closed-form fits and no recovery)."""
    if not self.learned:
      return {}
    return {"recover_fit": self.fit, "recover_init": self.init, "recover_steps": self.steps, "recover_lr": self.lr}


def check_fit(*, fit: str = "closed", init: str = "zero", steps: int = 200, lr: float = 1e-2) -> None:
  """One-line errors for fitting options outside ``FITS``, ``INITS``, ``steps >= 1``, ``lr > 0``."""
  if fit not in FITS:
    raise JaxpruneError(f"unknown recovery fit {fit!r}; choose one of: {', '.join(FITS)}")
  if init not in INITS:
    raise JaxpruneError(f"unknown recovery init {init!r}; choose one of: {', '.join(INITS)}")
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
    raise JaxpruneError(f"recovery steps must be an integer >= 1, got {steps!r}")
  if isinstance(lr, bool) or not (isinstance(lr, numbers.Real) and lr > 0):
    raise JaxpruneError(f"recovery learning rate must be positive, got {lr!r}")


def parse_recovery(text: str, *, width: int | None = None, damp: float = 1e-2, fit: str = "closed",
                   init: str = "zero", steps: int = 200, lr: float = 1e-2) -> Recovery:
  """``"none"``, ``"bias"`` or ``"lowrank:R"`` and the fitting options -> a checked :class:`Recovery`; ``R`` must
  lie in ``[1, width]``; a learned ``fit`` needs bias or lowrank."""
  kind, _, rank = str(text).partition(":")
  if kind not in KINDS or (kind == "lowrank") != bool(rank):
    raise JaxpruneError(f"unknown recovery {text!r}; use none, bias or lowrank:R (R a positive integer)")
  if damp < 0:
    raise JaxpruneError(f"ridge damping must be >= 0, got {damp}")
  check_fit(fit=fit, init=init, steps=steps, lr=lr)
  if kind == "none" and fit != "closed":
    raise JaxpruneError(f"recovery fit {fit!r} trains adapters: use it with bias or lowrank:R, not none")
  options = dict(damp=damp, fit=fit, init=init, steps=int(steps), lr=float(lr))
  if kind != "lowrank":
    return Recovery(kind, 0, **options)
  try:
    r = int(rank)
  except ValueError:
    raise JaxpruneError(f"lowrank rank must be an integer, got {rank!r}") from None
  if r < 1:
    raise JaxpruneError(f"lowrank rank must be at least 1, got {r}")
  if width is not None and r > width:
    raise JaxpruneError(f"lowrank rank {r} is larger than the model width {width}")
  return Recovery("lowrank", r, **options)


class Moments(NamedTuple):
  """Weighted first and centred second moments of inputs ``x`` and updates ``y`` (a pytree, float32).

  ``count ()``, ``mean_x, mean_y (d,)``, ``cxx = Σ w (x - x̄)(x - x̄)ᵀ (d, d)``, ``cxy = Σ w (x - x̄)(y - ȳ)ᵀ
  (d, d)``, ``syy = Σ w ‖y - ȳ‖²`` and ``sy2 = Σ w ‖y‖²`` (scalars).
  """

  count: jax.Array
  mean_x: jax.Array
  mean_y: jax.Array
  cxx: jax.Array
  cxy: jax.Array
  syy: jax.Array
  sy2: jax.Array


def _tokens(x, w):
  """``(b, t, d)`` activations and ``(b,)`` window weights -> ``(b*t, d)`` float32 and ``(b*t, 1)`` weights."""
  d = x.shape[-1]
  tw = jnp.broadcast_to(w.astype(jnp.float32)[:, None], x.shape[:-1]).reshape(-1, 1)
  return x.reshape(-1, d).astype(jnp.float32), tw


@jax.jit
def _first(x, y, w):
  x, tw = _tokens(x, w)
  y, _ = _tokens(y, w)
  return jnp.sum(tw), jnp.sum(x * tw, axis=0), jnp.sum(y * tw, axis=0)


@jax.jit
def _second(x, y, w, mean_x, mean_y):
  x, tw = _tokens(x, w)
  y, _ = _tokens(y, w)
  xc, yc = x - mean_x[None, :], y - mean_y[None, :]
  cxx = jnp.matmul((xc * tw).T, xc, precision=_HIGHEST)
  cxy = jnp.matmul((xc * tw).T, yc, precision=_HIGHEST)
  return cxx, cxy, jnp.sum(yc * yc * tw), jnp.sum(y * y * tw)


def moments(xs, ys, ws) -> Moments:
  """:class:`Moments` of matching lists of inputs ``(b, t, d)``, updates ``(b, t, d)`` and weights ``(b,)``."""
  first = [_first(x, y, w) for x, y, w in zip(xs, ys, ws)]
  count = sum(f[0] for f in first)
  mean_x = sum(f[1] for f in first) / count
  mean_y = sum(f[2] for f in first) / count
  second = [_second(x, y, w, mean_x, mean_y) for x, y, w in zip(xs, ys, ws)]
  cxx, cxy, syy, sy2 = (sum(s[k] for s in second) for k in range(4))
  return Moments(count, mean_x, mean_y, cxx, cxy, syy, sy2)


def fit_bias(m: Moments) -> dict:
  """The bias adapter ``{"bias": mean(y) (d,)}``: the least-squares constant update."""
  return {"bias": m.mean_y}


@functools.partial(jax.jit, static_argnames=("rank",))
def fit_lowrank(m: Moments, *, rank: int, damp: float = 1e-2) -> dict:
  """Reduced-rank ridge adapter ``{"bias" (d,), "down" (d, rank), "up" (rank, d)}`` (see module docstring)."""
  d = m.cxx.shape[0]
  lam = damp * jnp.mean(jnp.diag(m.cxx))
  a = m.cxx + lam * jnp.eye(d, dtype=jnp.float32)
  chol = jax.scipy.linalg.cho_factor(a, lower=True)
  w = jax.scipy.linalg.cho_solve(chol, m.cxy)  # (d, d) ridge map
  fitted = jnp.matmul(m.cxy.T, w, precision=_HIGHEST)  # W_λᵀ (XᵀX + λI) W_λ, symmetric PSD
  _, vecs = jnp.linalg.eigh(0.5 * (fitted + fitted.T))
  v = vecs[:, ::-1][:, :rank]
  down = jnp.matmul(w, v, precision=_HIGHEST)
  bias = m.mean_y - jnp.matmul(jnp.matmul(m.mean_x, down, precision=_HIGHEST), v.T, precision=_HIGHEST)
  return {"bias": bias, "down": down, "up": v.T}


@jax.jit
def residual(m: Moments, adapter: dict) -> jax.Array:
  """``Σ w ‖y - adapter(x)‖²`` from the moments alone (a scalar); the empty adapter ``{}`` is a skip."""
  d = m.mean_x.shape[0]
  wmat = (jnp.matmul(adapter["down"], adapter["up"], precision=_HIGHEST) if "down" in adapter
          else jnp.zeros((d, d), jnp.float32))
  offset = adapter.get("bias", jnp.zeros((d,), jnp.float32)) + jnp.matmul(m.mean_x, wmat, precision=_HIGHEST)
  offset = offset - m.mean_y
  cross = jnp.sum(wmat * m.cxy)
  quad = jnp.sum(wmat * jnp.matmul(m.cxx, wmat, precision=_HIGHEST))
  return m.syy - 2.0 * cross + quad + m.count * jnp.sum(offset * offset)


def fit(m: Moments, recovery: Recovery) -> dict:
  """The adapter params of ``recovery`` for the moments ``m`` (``{}`` for ``none``)."""
  if recovery.kind == "none":
    return {}
  if recovery.kind == "bias":
    return fit_bias(m)
  d = m.mean_x.shape[0]
  if recovery.rank > d:
    raise JaxpruneError(f"lowrank rank {recovery.rank} is larger than the model width {d}")
  return fit_lowrank(m, rank=recovery.rank, damp=recovery.damp)


@jax.jit
def apply_adapter(adapter: dict, h):
  """``h + adapter(h)`` for the stream ``h`` ``(b, t, d)``, exactly as the model's ``Adapter`` computes it."""
  rank = adapter["down"].shape[1] if "down" in adapter else 0
  return h + Adapter(rank=rank).apply({"params": adapter}, h)
