"""A retraining run's train state on disk: what a killed run needs to go on exactly where it stopped.

A state directory holds one subdirectory ``state/``, replaced atomically as a whole (see
:func:`jaxprune.io._atomic.atomic_dir`), so a kill at any moment leaves the previous complete state or the new one:

  state/progress.json   the run's identity (spec, optimizer and data settings, hash of the training windows),
                        the step, the data position and the losses so far
  state/arrays/         Orbax tree ``{"00000": leaf, ...}``: every leaf of the :class:`~jaxprune.retrain.TrainState`
                        (trainable parameters, adapters, optimizer moments and counts, step) in ``jax.tree`` order

In a multi-process run process 0 writes the state and the others wait until it is written; every process reads it
(from a file system all of them see) on its own.

Restoring needs a template state of the same run (a freshly initialised one): its tree structure, shapes and dtypes
must match the saved leaves exactly, so a state of another model or spec is refused in one line.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxprune.errors import JaxpruneError
from jaxprune.io._atomic import atomic_dir
from jaxprune.io._checkpoint import quiet_stray_reads
from jaxprune.runner._distributed import barrier, fetch, is_primary, local_checkpointer, save_local

STATE = "state"
PROGRESS = "progress.json"
FORMAT = "jaxprune-train-state/1"


def _keys(n: int) -> list[str]:
  return [f"{i:05d}" for i in range(n)]


def save_state(state_dir: Path | str, state: Any, progress: dict) -> Path:
  """Writes ``state`` (any pytree of arrays) and the JSON-able ``progress`` to ``state_dir/state``, atomically.

  Returns the path written (by process 0 alone in a multi-process run; every process returns once it is written)."""
  path = Path(state_dir) / STATE
  leaves = [fetch(x) for x in jax.tree.leaves(state)]
  if is_primary():
    with atomic_dir(path, replace=True) as tmp:
      save_local((tmp / "arrays").absolute(), dict(zip(_keys(len(leaves)), leaves)))
      (tmp / PROGRESS).write_text(json.dumps({"format": FORMAT, **progress}, default=str))
  barrier(f"train state {path}")
  return path


def has_state(state_dir: Path | str | None) -> bool:
  """Whether ``state_dir`` holds a saved state (complete or not: a damaged one is reported by :func:`load_state`)."""
  return state_dir is not None and (Path(state_dir) / STATE).exists()


def read_progress(state_dir: Path | str) -> dict:
  """The ``progress.json`` of a saved state; one-line :class:`JaxpruneError` if unreadable."""
  path = Path(state_dir) / STATE
  try:
    progress = json.loads((path / PROGRESS).read_text())
  except (OSError, ValueError) as err:
    raise JaxpruneError(f"{path}: train state is corrupt or incomplete ({type(err).__name__}); remove it to "
                        "start over") from None
  if not isinstance(progress, dict) or progress.get("format") != FORMAT:
    raise JaxpruneError(f"{path}: not a jaxprune train state (format {FORMAT} expected); remove it to start over")
  return progress


def load_state(state_dir: Path | str, template: Any, identity: dict) -> tuple[Any, dict]:
  """``(state, progress)`` restored into the structure of ``template`` (a pytree of arrays of the same run).

  ``identity`` must equal the saved one (another run's state is refused); damaged or mismatching arrays give a
  one-line :class:`JaxpruneError` naming the directory.
  """
  path = Path(state_dir) / STATE
  progress = read_progress(state_dir)
  if progress.get("identity") != json.loads(json.dumps(identity, default=str)):
    raise JaxpruneError(f"{path} holds the train state of a different run (other model, data or options); "
                        "remove it or write elsewhere")
  leaves, treedef = jax.tree.flatten(template)
  abstract = {k: jax.ShapeDtypeStruct(np.shape(x), x.dtype) for k, x in zip(_keys(len(leaves)), leaves)}
  quiet_stray_reads()
  try:
    with local_checkpointer() as ckptr:
      restored = ckptr.restore((path / "arrays").absolute(), abstract)
    restored = [np.asarray(restored[k]) for k in _keys(len(leaves))]
  except Exception as err:  # Orbax raises many types for missing, truncated or mismatching files
    first = str(err).splitlines()[0] if str(err) else ""
    raise JaxpruneError(f"{path}: train state is corrupt or incomplete ({type(err).__name__}: {first[:160]}); "
                        "remove it to start over") from None
  for key, got, want in zip(abstract, restored, abstract.values()):
    if got.shape != want.shape or got.dtype != want.dtype:
      raise JaxpruneError(f"{path}: saved leaf {key} is {got.dtype}{list(got.shape)}, expected "
                          f"{want.dtype}{list(want.shape)}; remove it to start over")
  return jax.tree.unflatten(treedef, restored), progress


def clear_state(state_dir: Path | str | None) -> None:
  """Removes ``state_dir`` (after a finished run has written its result; process 0 of a multi-process run)."""
  if state_dir is not None and is_primary():
    shutil.rmtree(state_dir, ignore_errors=True)
