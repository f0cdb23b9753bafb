"""Sparsity patterns: what a solver must leave non-zero.

Two small immutable types. They are hashable, so they can be static arguments of ``jax.jit``, and registered as
pytrees without leaves, so they can also be passed as ordinary arguments to a function a user jits or vmaps:

* :class:`Unstructured` -- a fraction ``sparsity`` of the weights is pruned, compared within a ``scope``.
* :class:`NM` -- in every row, in every group of ``m`` consecutive inputs, ``n`` weights are **kept**.

N:M naming: ``NM(n, m)`` follows NVIDIA's and jaxpruner's ``NByM(n, m)``: ``n`` is the number of weights
*kept* per group of ``m``. The SparseGPT and Wanda command lines pass the number *pruned* instead; the two
conventions agree only at 2:4 and 4:8. ``NM(1, 4)`` keeps one weight in four (75 % sparse); the SparseGPT
``--prunen 1 --prunem 4`` keeps three (25 % sparse).

>>> NM(1, 4).sparsity
0.75
>>> Unstructured(0.5).scope is None
True
>>> NM(np.int64(2), 4) == NM(2, 4) and hash(NM(np.int64(2), 4)) == hash(NM(2, 4))
True
>>> parse_pattern(None, "2:4")
NM(n=2, m=4)
>>> pattern_name(NM(2, 4)), pattern_name(Unstructured(0.5, scope="row"))
('2:4', 'unstructured:0.5:row')
"""
from __future__ import annotations

import dataclasses
import numbers

import jax
import numpy as np

from jaxprune.errors import JaxpruneError

SCOPES = ("layer", "row")


def _is_int(x) -> bool:
  """Python and NumPy integers (``numbers.Integral``), not booleans."""
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Unstructured:
  """Prune ``floor(sparsity · size)`` weights, ranked within ``scope``.

  Attributes:
    sparsity: fraction of weights pruned, in ``[0, 1)``.
    scope: ``"layer"`` (one ranking over the whole ``(d_out, d_in)`` matrix), ``"row"`` (one ranking per output
      row, ``floor(sparsity · d_in)`` pruned in each), or ``None`` for the method's default: magnitude per
      layer, Wanda and ADMM per row, SparseGPT jointly over all rows of each column block.
  """

  sparsity: float
  scope: str | None = None

  def __post_init__(self):
    s = self.sparsity
    if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Real) or not 0.0 <= s < 1.0:
      raise JaxpruneError(f"sparsity must be a number in [0, 1), got {s!r}")
    object.__setattr__(self, "sparsity", float(s))
    if self.scope is not None and self.scope not in SCOPES:
      raise JaxpruneError(f"scope must be one of {', '.join(SCOPES)} or None, got {self.scope!r}")

  def check_width(self, d_in: int) -> None:
    """Any input width works for an unstructured pattern."""
    del d_in


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class NM:
  """N:M semi-structured sparsity: ``n`` weights **kept** in every ``m`` consecutive inputs of a row.

  Attributes:
    n: weights kept per group (NVIDIA / jaxpruner meaning; SparseGPT and Wanda pass ``m - n``).
    m: group length along the input dimension; it must divide ``d_in``.
  """

  n: int
  m: int

  def __post_init__(self):
    if not (_is_int(self.n) and _is_int(self.m)) or self.n <= 0 or self.m <= 0:
      raise JaxpruneError(f"N:M needs positive integers n and m, got {self.n!r}:{self.m!r}")
    object.__setattr__(self, "n", int(self.n))  # NumPy integers become ints: equal patterns hash equally
    object.__setattr__(self, "m", int(self.m))
    if self.n > self.m:
      raise JaxpruneError(f"N:M keeps n of every m weights, so n <= m is needed, got {self.n}:{self.m}")

  @property
  def sparsity(self) -> float:
    """Fraction of weights pruned, ``(m - n) / m``."""
    return (self.m - self.n) / self.m

  @property
  def pruned(self) -> int:
    """Weights pruned per group, ``m - n`` (the SparseGPT/Wanda ``prunen``)."""
    return self.m - self.n

  def check_width(self, d_in: int) -> None:
    """Raises :class:`JaxpruneError` unless ``m`` divides the input width ``d_in``."""
    if d_in % self.m:
      raise JaxpruneError(f"N:M pattern {self.n}:{self.m} needs an input width divisible by {self.m}, got {d_in}")


Pattern = Unstructured | NM


def parse_pattern(sparsity: float | None, nm: str | None, *, scope: str | None = None) -> Pattern:
  """Builds a pattern from command-line values: either ``sparsity`` (e.g. ``0.5``) or ``nm`` (``"2:4"``).

  ``nm`` reads ``"N:M"`` with N the number of weights **kept** per M, as :class:`NM` does.
  """
  if (sparsity is None) == (nm is None):
    raise JaxpruneError("give exactly one of a sparsity (e.g. 0.5) or an N:M pattern (e.g. 2:4)")
  if nm is None:
    return Unstructured(sparsity, scope=scope)
  if scope is not None:
    raise JaxpruneError("scope applies to unstructured sparsity only, not to an N:M pattern")
  parts = nm.strip().split(":")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise JaxpruneError(f"N:M pattern must look like 2:4 (N kept of every M), got {nm!r}")
  return NM(int(parts[0]), int(parts[1]))


def pattern_name(pattern: Pattern) -> str:
  """The command-line spelling of a pattern: ``"2:4"`` (N kept of every M), ``"unstructured:0.5[:scope]"``."""
  if isinstance(pattern, NM):
    return f"{pattern.n}:{pattern.m}"
  return f"unstructured:{pattern.sparsity:g}" + (f":{pattern.scope}" if pattern.scope else "")
