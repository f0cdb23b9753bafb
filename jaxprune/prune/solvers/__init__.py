"""Layer-wise pruning solvers: pure functions ``(w, stats, *, pattern, **hparams) -> SolverResult``.

``w`` is ``(d_out, d_in)`` (the HF layout), masks are ``True`` = kept. Every solver is jit-compiled, with its
pattern and options static (one compilation per shape and option set); it can be called as it is, or inside a
function the caller jits or vmaps (patterns are pytrees without leaves, so they may be passed as arguments).
:data:`SOLVERS` names every method for the sequential pass and the command line; :func:`get_solver` looks one up.

Every solver also takes ``with_error`` (default ``True``): ``False`` leaves the reconstruction error out
(``SolverResult.error`` is ``None``), which with a Gram saves a ``d_out × d_in × d_in`` product. It is not a
hyper-parameter: :func:`solver_options` does not list it. Nor is ``prepared``, which a solver with a ``prepare``
step (:class:`SolverSpec`) takes: what that step computed from the statistics alone, shared by the linears that read
the same inputs.

>>> sorted(SOLVERS)
['admm', 'magnitude', 'sparsegpt', 'wanda']
>>> get_solver("wanda").needs_gram
False
"""
from __future__ import annotations

import inspect
import types
from typing import Any, Callable, Mapping, NamedTuple

from jaxprune.errors import JaxpruneError
from jaxprune.prune._patterns import NM, Unstructured
from jaxprune.prune.solvers._admm import ADMMFactor, admm, admm_prepare, admm_update
from jaxprune.prune.solvers._base import SolverResult, reconstruction_error
from jaxprune.prune.solvers._magnitude import magnitude
from jaxprune.prune.solvers._sparsegpt import SparseGPTFactor, sparsegpt, sparsegpt_prepare
from jaxprune.prune.solvers._wanda import wanda


class SolverSpec(NamedTuple):
  """A pruning method.

  Attributes:
    name: the method's name on the command line.
    solve: ``(w, stats, *, pattern, **hparams) -> SolverResult``.
    needs_gram: whether ``stats`` must hold the full Gram matrix (else ``init_stats(d_in, gram=False)`` does).
    paper: where the method comes from.
    needs_calibration: whether the method needs calibration data at all (magnitude does not).
    prepare: ``(stats, **options) -> prepared`` or ``None``: the solver's work on the statistics alone
      (SparseGPT: the factor of the damped inverse Gram; ADMM: the normalised Gram and its damped inverse), done
      once for the linears of an input group and passed to ``solve(..., prepared=prepared)``; it takes those of the
      solver's options it names.
  """

  name: str
  solve: Callable[..., SolverResult]
  needs_gram: bool
  paper: str
  needs_calibration: bool = True
  prepare: Callable[..., Any] | None = None


SOLVERS: Mapping[str, SolverSpec] = types.MappingProxyType({
    "magnitude": SolverSpec("magnitude", magnitude, False, "Zhu & Gupta 2017, arXiv:1710.01878", False),
    "wanda": SolverSpec("wanda", wanda, False, "Sun et al. 2023, arXiv:2306.11695"),
    "sparsegpt": SolverSpec("sparsegpt", sparsegpt, True, "Frantar & Alistarh 2023, arXiv:2301.00774",
                            prepare=sparsegpt_prepare),
    "admm": SolverSpec("admm", admm, True, "Boza 2024, arXiv:2401.02938", prepare=admm_prepare),
})


def get_solver(name: str) -> SolverSpec:
  """The :class:`SolverSpec` called ``name``; :class:`JaxpruneError` listing the known ones otherwise."""
  try:
    return SOLVERS[name]
  except KeyError:
    raise JaxpruneError(f"unknown pruning method {name!r}; known: {', '.join(sorted(SOLVERS))}") from None


def solver_options(name: str) -> tuple[str, ...]:
  """The keyword options (hyper-parameters) of solver ``name``, besides ``pattern``, ``with_error`` and
  ``prepared``.

  >>> solver_options("sparsegpt")
  ('blocksize', 'percdamp', 'max_retries', 'ties')
  """
  params = inspect.signature(get_solver(name).solve).parameters.values()
  return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("pattern", "with_error",
                                                                                         "prepared"))


def check_options(name: str, pattern, options) -> tuple[tuple[str, Any], ...]:
  """``options`` (a dict, or ``(name, value)`` pairs) of solver ``name`` as the sorted, hashable pairs a
  ``PruneSpec`` holds; one-line :class:`JaxpruneError` for an unknown method, a pattern that is not one, an option
  the solver does not take, or a value that cannot be a static (hashable) argument."""
  known = solver_options(name)
  if not isinstance(pattern, (Unstructured, NM)):
    raise JaxpruneError(f"pattern must be jaxprune.Unstructured(sparsity) or jaxprune.NM(n, m), got {pattern!r}")
  if isinstance(options, Mapping):
    pairs = list(options.items())
  else:
    try:
      pairs = [(k, v) for k, v in options]
    except (TypeError, ValueError):
      raise JaxpruneError(f"{name} options must be a dict or (name, value) pairs, got {options!r}") from None
  if len({k for k, _ in pairs}) != len(pairs):
    raise JaxpruneError(f"{name} options name an option twice: {options!r}")
  for key, value in pairs:
    if key not in known:
      raise JaxpruneError(f"{name} takes no option {key!r} (its options: {', '.join(known) or 'none'})")
    try:
      hash(value)
    except TypeError:
      raise JaxpruneError(f"{name} option {key}={value!r} must be a hashable value (a number or a string)") from None
  return tuple(sorted(pairs, key=lambda pair: pair[0]))


__all__ = [
    "ADMMFactor", "SOLVERS", "SolverResult", "SolverSpec", "SparseGPTFactor", "admm", "admm_prepare", "admm_update",
    "check_options", "get_solver", "magnitude", "reconstruction_error", "solver_options", "sparsegpt",
    "sparsegpt_prepare", "wanda",
]
