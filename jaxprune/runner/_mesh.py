"""The device mesh of a run: a ``data`` axis that splits token windows, and an optional ``model`` axis.

The ``data`` axis carries data parallelism (windows of a batch split over devices, parameters replicated, per-shard
statistics reduced with ``psum``). The ``model`` axis, where present, splits each weight matrix of the placed
parameters along a dimension it divides (``Runner.place``) and the rows of the row-parallel solvers; the command
line asks for it with ``--model-axis``.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from jaxprune.errors import JaxpruneError


def make_mesh(devices=None, *, model: int = 1) -> Mesh:
  """A ``("data",)`` mesh over ``devices`` (default: all), or ``("data", "model")`` with ``model > 1``.

  >>> make_mesh(jax.devices()[:1]).axis_names
  ('data',)
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  if model < 1 or devices.size % model:
    raise JaxpruneError(f"a model axis of {model} does not divide the {devices.size} devices")
  if model == 1:
    return Mesh(devices, ("data",))
  return Mesh(devices.reshape(-1, model), ("data", "model"))


def data_mesh(devices=None) -> Mesh:
  """A 1-D ``("data",)`` mesh over ``devices`` (default: all)."""
  return make_mesh(devices)


def data_size(mesh: Mesh | None) -> int:
  """How many ways a batch is split: the size of the ``data`` axis (1 without a mesh)."""
  return mesh.shape["data"] if mesh is not None and "data" in mesh.shape else 1
