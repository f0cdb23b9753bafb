"""Parameter trees addressed by paths: the one walker over nested ``dict`` (and ``list``) parameter trees.

A path is a ``"/"``-joined string of keys (``"self_attn/q_proj"``, ``"layers/3/mlp/up_proj/kernel"``); list
indices appear as decimal keys.

>>> tree = {"a": {"b": 1}, "layers": [{"c": 2}]}
>>> flatten(tree)
{'a/b': 1, 'layers/0/c': 2}
>>> get(set_at(tree, "a/b", 5), "a/b"), tree["a"]["b"]
(5, 1)
>>> unflatten({"x/y": 1, "x/z": 2})
{'x': {'y': 1, 'z': 2}}
"""
from __future__ import annotations

from collections.abc import Iterator

import jax

SEP = "/"


def key_str(entry) -> str:
  """The string of one entry of a ``jax.tree_util`` key path (dict key, sequence index or attribute)."""
  return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))


def items(tree) -> Iterator[tuple[tuple[str, ...], object]]:
  """``(path as a tuple of keys, leaf)`` for every leaf of ``tree``, in ``jax.tree`` order."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    yield tuple(key_str(k) for k in path), leaf


def flatten(tree) -> dict[str, object]:
  """``{path: leaf}`` of ``tree``."""
  return {SEP.join(path): leaf for path, leaf in items(tree)}


def unflatten(flat: dict[str, object]) -> dict:
  """The nested dicts of ``{path: leaf}`` (the inverse of :func:`flatten` for trees of dicts)."""
  tree: dict = {}
  for path, value in flat.items():
    *parents, last = path.split(SEP)
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = value
  return tree


def get(tree, path: str, default=None):
  """The node at ``path`` (``default`` where some key is missing)."""
  node = tree
  for part in path.split(SEP):
    if isinstance(node, dict) and part in node:
      node = node[part]
    elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
      node = node[int(part)]
    else:
      return default
  return node


def set_at(tree: dict, path: str, value) -> dict:
  """A copy of ``tree`` with the node at ``path`` replaced by ``value``; only the dicts on the path are copied
  (missing ones are created)."""
  first, _, rest = path.partition(SEP)
  new = dict(tree)
  new[first] = set_at(tree.get(first, {}), rest, value) if rest else value
  return new
