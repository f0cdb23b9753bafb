"""Layer-wise pruning solvers: pure functions ``(w, stats, *, pattern, **hparams) -> SolverResult``.

``w`` is ``(d_out, d_in)`` (the HF layout), masks are ``True`` = kept. :data:`SOLVERS` names every method for
the sequential pass and the command line; :func:`get_solver` looks one up.

>>> sorted(SOLVERS)
['admm', 'magnitude', 'sparsegpt', 'wanda']
>>> get_solver("wanda").needs_gram
False
"""
from __future__ import annotations

import types
from typing import Callable, Mapping, NamedTuple

from jaxprune.errors import JaxpruneError
from jaxprune.prune.solvers._admm import admm, admm_update
from jaxprune.prune.solvers._base import SolverResult, reconstruction_error
from jaxprune.prune.solvers._magnitude import magnitude
from jaxprune.prune.solvers._sparsegpt import sparsegpt
from jaxprune.prune.solvers._wanda import wanda


class SolverSpec(NamedTuple):
  """A pruning method.

  Attributes:
    name: the method's name on the command line.
    solve: ``(w, stats, *, pattern, **hparams) -> SolverResult``.
    needs_gram: whether ``stats`` must hold the full Gram matrix (else ``init_stats(d_in, gram=False)`` does).
    paper: where the method comes from.
  """

  name: str
  solve: Callable[..., SolverResult]
  needs_gram: bool
  paper: str


SOLVERS: Mapping[str, SolverSpec] = types.MappingProxyType({
    "magnitude": SolverSpec("magnitude", magnitude, False, "Zhu & Gupta 2017, arXiv:1710.01878"),
    "wanda": SolverSpec("wanda", wanda, False, "Sun et al. 2023, arXiv:2306.11695"),
    "sparsegpt": SolverSpec("sparsegpt", sparsegpt, True, "Frantar & Alistarh 2023, arXiv:2301.00774"),
    "admm": SolverSpec("admm", admm, True, "Boza 2024, arXiv:2401.02938"),
})


def get_solver(name: str) -> SolverSpec:
  """The :class:`SolverSpec` called ``name``; :class:`JaxpruneError` listing the known ones otherwise."""
  try:
    return SOLVERS[name]
  except KeyError:
    raise JaxpruneError(f"unknown pruning method {name!r}; known: {', '.join(sorted(SOLVERS))}") from None


__all__ = [
    "SOLVERS", "SolverResult", "SolverSpec", "admm", "admm_update", "get_solver", "magnitude",
    "reconstruction_error", "sparsegpt", "wanda",
]
