"""Choosing which linears to prune by module name, as llm-compressor's ``targets``/``ignore`` do.

A linear is named ``layers.{i}.{path}`` with the path's ``/`` as ``.`` (``layers.0.self_attn.q_proj``,
``layers.11.mlp.down_proj``; OPT: ``layers.3.fc1``), or by its Hugging Face module name
(``model.layers.0.mlp.down_proj``, ``model.decoder.layers.3.fc1``). A pattern is

- a shell glob (``fnmatch``, case-sensitive) that matches a whole name or any dot-separated tail of it:
  ``down_proj``, ``mlp.*``, ``self_attn.[qk]_proj``, ``layers.0.*``;
- or, after ``re:``, a regular expression that must match a whole name: ``re:layers\\.(0|1)\\..*``.

The selection is every linear matched by some target (all linears when no target is given) and by no ignore
pattern. A pattern that matches no linear is an error, so a typo cannot silently prune everything.

>>> from jaxprune.models._config import ModelConfig
>>> c = ModelConfig("llama", 32, 8, 16, 2, 2, 2, 4, 64, True)
>>> sorted(select_linears(c, ["mlp.*"], ["layers.0.*"]))
[(1, 'mlp/down_proj'), (1, 'mlp/gate_proj'), (1, 'mlp/up_proj')]
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from jaxprune.errors import JaxpruneError
from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig


def linear_names(config: ModelConfig) -> dict[tuple[int, str], tuple[str, str]]:
  """``(layer, path)`` -> ``(short name, Hugging Face module name)`` of every linear the blocks compute (a removed
  sublayer has none)."""
  prefix = "model." if config.family == "llama" else "model.decoder."
  names = {}
  for i in range(config.num_layers):
    attention, mlp = config.sublayer_modes(i)
    for paths in M.linear_groups(config).values():
      for path in paths:
        mode = attention if path.startswith("self_attn/") else mlp
        if mode != "full":
          continue
        short = f"layers.{i}.{path.replace('/', '.')}"
        names[(i, path)] = (short, prefix + short)
  return names


def _matcher(pattern: str):
  if not isinstance(pattern, str) or not pattern.strip():
    raise JaxpruneError(f"a module-name pattern must be a non-empty string, got {pattern!r}")
  if pattern.startswith("re:"):
    try:
      regex = re.compile(pattern[3:])
    except re.error as err:
      raise JaxpruneError(f"pattern {pattern!r} is not a valid regular expression: {err}") from None
    return lambda name: regex.fullmatch(name) is not None

  def glob(name: str) -> bool:
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[k:]), pattern) for k in range(len(parts)))

  return glob


def _matched(pattern: str, names: dict, option: str) -> set[tuple[int, str]]:
  match = _matcher(pattern)
  hit = {key for key, both in names.items() if any(match(n) for n in both)}
  if not hit:
    example = next(iter(names.values()), ("layers.0.mlp.down_proj",))[0]
    raise JaxpruneError(f"{option} pattern {pattern!r} matches no linear (names look like {example})")
  return hit


def _patterns(value, option: str) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  if not isinstance(value, Iterable):
    raise JaxpruneError(f"{option} must be a pattern or a list of patterns, got {value!r}")
  return tuple(value)


def select_linears(config: ModelConfig, targets=None, ignore=None) -> frozenset[tuple[int, str]]:
  """The ``(layer, path)`` of the linears to prune (``path`` as in a block's params: ``"mlp/down_proj"``).

  Args:
    config: the model (its depth, family and removed sublayers).
    targets: a pattern or patterns (see the module docstring); None or empty: every linear.
    ignore: patterns of linears to leave dense.

  Raises:
    JaxpruneError: a pattern that is not one or matches no linear, or a selection with no linear left.
  """
  names = linear_names(config)
  targets, ignore = _patterns(targets, "targets"), _patterns(ignore, "ignore")
  chosen = set(names) if not targets else set().union(*(_matched(p, names, "targets") for p in targets))
  for pattern in ignore:
    chosen -= _matched(pattern, names, "ignore")
  if not chosen:
    raise JaxpruneError("targets and ignore leave no linear to prune")
  return frozenset(chosen)
