"""What every solver shares: its result type, input checks, compute dtype, reconstruction error, and how its
programs are compiled."""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxprune.errors import JaxpruneError
from jaxprune.prune._masks import TIES
from jaxprune.prune._patterns import NM, Unstructured
from jaxprune.prune._stats import Stats

HIGHEST = jax.lax.Precision.HIGHEST

SOLVER_COMPILER_OPTIONS = {"xla_gpu_autotune_level": 0}
"""XLA options of the pass's programs that solve one linear (its jit of a solver, the dense output's energy, LLM
Surgeon's per-linear programs) on a GPU: no autotuning. Such a program is compiled once per linear shape and then
runs a few dozen times, for milliseconds; on an H200, SparseGPT's first call on each of SmolLM2-135M's four linear
shapes took 10.5-14.1 s with XLA's default autotuning and 1.9-2.4 s without it, and its later calls 20-45 ms either
way (``XLA_FLAGS=--xla_gpu_autotune_level=0`` in ``experiments/accelerator/compile_probe.py``). On other backends
these programs compile without options (a TPU has not run this one here). The public solvers (``sparsegpt`` ...)
stay plain ``jax.jit`` s, so that a user's own jit can call them (JAX takes compiler options on the outermost jit
only)."""


class SolverProgram:
  """A function jitted twice: with :data:`SOLVER_COMPILER_OPTIONS` for GPU backends, plainly for the others; each
  call (and ``lower``) uses the one for ``jax.default_backend()``, known only once JAX has started. For programs no
  other jit calls."""

  def __init__(self, fun, **jit_kwargs):
    self.plain = jax.jit(fun, **jit_kwargs)
    self.gpu = jax.jit(fun, compiler_options=SOLVER_COMPILER_OPTIONS, **jit_kwargs)
    functools.update_wrapper(self, fun)

  def jitted(self):
    """The jit for the default backend."""
    return self.gpu if jax.default_backend() == "gpu" else self.plain

  def __call__(self, *args, **kwargs):
    return self.jitted()(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self.jitted().lower(*args, **kwargs)

  def clear_cache(self) -> None:
    self.plain.clear_cache()
    self.gpu.clear_cache()

  def _cache_size(self) -> int:
    return self.plain._cache_size() + self.gpu._cache_size()


def solver_jit(**jit_kwargs):
  """A decorator making a :class:`SolverProgram`; ``jit_kwargs`` as ``jax.jit``'s."""
  return functools.partial(SolverProgram, **jit_kwargs)


class SolverResult(NamedTuple):
  """Output of a solver (a pytree).

  Attributes:
    w: ``(d_out, d_in)`` pruned (and possibly updated) weights, in the input dtype; zero wherever ``mask`` is
      ``False`` (it may hold further zeros: weights already zero, or inputs SparseGPT finds dead).
    mask: ``(d_out, d_in)`` bool, ``True`` = kept; it prunes exactly the count the pattern asks for.
    error: ``()`` float32 reconstruction error ``tr((W - Ŵ) G (W - Ŵ)ᵀ)`` of the returned weights, with
      ``G = stats.gram``; with the diagonal ``stats.sq_norms`` only when there is no Gram, and ``G = I``
      (squared Frobenius norm) when ``stats`` is ``None``. ``None`` when the solver was called with
      ``with_error=False`` (with a Gram, the error is a ``d_out × d_in × d_in`` product: more than a selection).
  """

  w: jax.Array
  mask: jax.Array
  error: jax.Array | None


def compute_dtype(w: jax.Array):
  """float32 for every input dtype, float64 for float64 inputs (exact checks under ``jax.enable_x64``)."""
  return jnp.float64 if w.dtype == jnp.float64 else jnp.float32


def check_inputs(name: str, w: jax.Array, stats: Stats | None, pattern, *, needs: str | None) -> None:
  """Raises :class:`JaxpruneError` on inputs ``name`` cannot use: shapes, missing statistics, bad pattern.

  ``needs``: ``None`` (statistics optional), ``"stats"`` (squared norms) or ``"gram"`` (the full Gram).
  """
  if not isinstance(pattern, (Unstructured, NM)):
    raise JaxpruneError(f"{name}: pattern must be Unstructured or NM, got {pattern!r}")
  if w.ndim != 2:
    raise JaxpruneError(f"{name}: weights must be (d_out, d_in), got shape {w.shape}")
  d_in = w.shape[1]
  pattern.check_width(d_in)
  if stats is None:
    if needs is not None:
      raise JaxpruneError(f"{name} needs calibration statistics")
    return
  if stats.sq_norms.shape != (d_in,):
    raise JaxpruneError(f"{name}: statistics of width {stats.sq_norms.shape[0]} do not fit weights {w.shape}")
  if needs == "gram":
    check_gram(name, stats)


def check_gram(name: str, stats: Stats | None) -> None:
  """Raises :class:`JaxpruneError` unless ``stats`` holds the full Gram matrix that solver ``name`` needs."""
  if stats is None or stats.gram is None:
    raise JaxpruneError(f"{name} needs the full Gram matrix; accumulate statistics with gram=True")


def check_ties(name: str, ties: str, pattern) -> None:
  """Raises :class:`JaxpruneError` unless ``ties`` is a tie rule of :mod:`jaxprune.prune._masks` that fits
  ``pattern`` (``"threshold"`` is a threshold rule: unstructured sparsity only)."""
  if ties not in TIES:
    raise JaxpruneError(f"{name}: ties must be one of {', '.join(TIES)}, got {ties!r}")
  if ties == "threshold" and isinstance(pattern, NM):
    raise JaxpruneError(f"{name}: ties='threshold' applies to unstructured sparsity; N:M prunes exactly m - n "
                        "per group")


def reconstruction_error(w: jax.Array, w_hat: jax.Array, stats: Stats | None) -> jax.Array:
  """``tr((W - Ŵ) G (W - Ŵ)ᵀ)`` as a float32 scalar (see :class:`SolverResult` for ``G``)."""
  dtype = compute_dtype(w)
  delta = w.astype(dtype) - w_hat.astype(dtype)
  if stats is None:
    err = jnp.sum(delta * delta)
  elif stats.gram is None:
    err = jnp.sum(delta * delta * stats.sq_norms.astype(dtype)[None, :])
  else:
    err = _gram_error(delta, stats.gram.astype(dtype))
  return err.astype(jnp.float32)


def _gram_error(delta: jax.Array, gram: jax.Array) -> jax.Array:
  """``Σ δ ⊙ (δ G)`` by blocks of ``G``'s columns, in a loop: no second ``d_out × d_in`` product is held (0.18 GB
  at 4096 × 11008), and the blocks are sliced when used (a loop keeps XLA from slicing them all up front). The
  last block is moved back to end at ``d_in``; the columns it shares with the one before count once."""
  d_in = gram.shape[1]
  width = min(d_in, _ERROR_COLUMNS)

  def add(k, err):
    start = jnp.minimum(k * width, d_in - width)
    fresh = (start + jnp.arange(width)) >= k * width
    cols = jax.lax.dynamic_slice_in_dim(delta, start, width, axis=1)
    product = jnp.matmul(delta, jax.lax.dynamic_slice_in_dim(gram, start, width, axis=1), precision=HIGHEST)
    return err + jnp.sum(jnp.where(fresh[None, :], cols * product, 0))

  return jax.lax.fori_loop(0, -(-d_in // width), add, jnp.zeros((), delta.dtype))


_ERROR_COLUMNS = 2048  # columns of G per product in reconstruction_error


def check_with_error(with_error) -> None:
  if not isinstance(with_error, bool):
    raise JaxpruneError(f"with_error must be True or False, got {with_error!r}")


def finish(w_in: jax.Array, w_new: jax.Array, mask: jax.Array, stats: Stats | None, *,
           with_error: bool) -> SolverResult:
  """Casts ``w_new`` back to the input dtype (zeroing pruned entries) and adds the error of what is returned
  (``None`` unless ``with_error``)."""
  check_with_error(with_error)
  w_out = jnp.where(mask, w_new, 0).astype(w_in.dtype)
  return SolverResult(w=w_out, mask=mask, error=reconstruction_error(w_in, w_out, stats) if with_error else None)
