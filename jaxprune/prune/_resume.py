"""Crash-safe progress of a pruning pass: after every block, what is needed to go on from the next one.

A pass writing checkpoint ``OUT`` keeps its progress in the sibling directory ``OUT.partial/``:

  progress.json      the run's identity (method, pattern, hyper-parameters, calibration hash, model) and
                     the number of finished blocks
  block_NNN.npz      pruned params and masks of block NNN, and its per-linear report (of a streamed pass: the
                     report only; the params and masks are in layers/NNNNN/params.safetensors and
                     masks.safetensors)
  inputs.npy         calibration activations entering the next block

Each file is written to a temporary name and renamed, and ``progress.json`` last, so a kill at any moment leaves
a consistent state. A rerun with the same identity resumes from the last finished block; a different identity
refuses to mix.
"""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _tree as tree
from jaxprune.errors import JaxpruneError
from jaxprune.io._atomic import atomic_write
from jaxprune.io._checkpoint import pack_masks, saved_block, write_block
from jaxprune.io._stream import is_streamed, timed, with_layer, write_behind
from jaxprune.prune._sequential import BlockState
from jaxprune.runner._distributed import barrier, is_primary


def partial_dir(out: Path) -> Path:
  return Path(out).with_name(Path(out).name + ".partial")


def _float(saved: np.ndarray) -> np.ndarray:
  """A param as saved by ``np.savez``, which writes bfloat16 (not a NumPy type) as 2-byte voids: bfloat16 again."""
  return saved.view(jnp.bfloat16) if saved.dtype.kind == "V" and saved.dtype.itemsize == 2 else saved


class ResumeStore:
  """Saves a :class:`BlockState` after each block and restores it. ``identity``: JSON-able run description."""

  def __init__(self, out: Path, identity: dict):
    self.dir = partial_dir(out)
    self.identity = json.loads(json.dumps(identity, default=str))
    self._pending = None  # (block, future of its write) given to save_and_release and not yet released

  def save(self, state: BlockState) -> None:
    """Writes the block just finished (params, masks and report in ``block_NNN.npz``), then the progress."""
    i = state.done - 1
    arrays = {f"params/{k}": v for k, v in tree.flatten(jax.device_get(state.params["layers"][i])).items()}
    arrays.update({f"masks/{k}": v for k, v in state.masks[i].items()})
    if is_primary():  # written once, by process 0; the others wait until it is
      self._write(state.done, state.reports[i], state.inputs, arrays)
    barrier(f"resume {self.dir} block {i}")

  def save_and_release(self, state: BlockState) -> BlockState:
    """For a streamed pass: writes the block just finished as safetensors files (``layers/NNNNN/params.safetensors``
    and ``masks.safetensors``, see :func:`~jaxprune.io._checkpoint.write_block`; the final checkpoint links them
    instead of writing them again) and its report, then the progress, on the background writing thread
    (:func:`~jaxprune.io._stream.write_behind`) while the pass goes on with the next block; waits first for the
    write before it. Returns the state with the block's params and masks replaced by loaders of where they are
    being written: the writing thread holds the params and the masks (packed into bits) until they are written,
    so the pass holds at most that block besides the one it works on. The loaders must not be called before
    :meth:`finish` has returned."""
    self._wait()
    i = state.done - 1
    if is_primary():  # written once, by process 0; the others wait until it is, and read it from there
      shutil.rmtree(self._block_root(i), ignore_errors=True)  # a block written before a crash, not counted as done
      params = jax.device_get(state.params["layers"][i])
      block_masks = {f"{path}/kernel": mask for path, mask in state.masks[i].items()}
      masks = pack_masks(tree.unflatten(block_masks)) if block_masks else None
      write = functools.partial(self._write_block, i, params, masks, state.reports[i], state.inputs)
      self._pending = (i, write_behind(write))
    else:
      self._pending = (i, None)
    return self._released(state, i)

  def finish(self) -> None:
    """Returns once every block given to :meth:`save_and_release` is written (its loaders can then be called)."""
    self._wait()

  def _wait(self) -> None:
    """Waits for the block being written (raising what its write raised), and until every process has."""
    pending, self._pending = self._pending, None
    if pending is None:
      return
    i, future = pending
    if future is not None:
      with timed("write"):
        future.result()
    barrier(f"resume {self.dir} block {i}")

  def _write_block(self, i: int, params, masks, report: list, inputs) -> None:
    root = self._block_root(i)
    write_block(root, "params", params)
    if masks is not None:
      write_block(root, "masks", masks)
    self._write(i + 1, report, inputs, {})

  def _block_root(self, i: int) -> Path:
    return self.dir / "layers" / f"{i:05d}"

  def _released(self, state: BlockState, i: int) -> BlockState:
    root = self._block_root(i)
    layers = with_layer(state.params["layers"], i, saved_block(root, "params", self.dir))
    masks = list(state.masks)
    masks[i] = saved_block(root, "masks", self.dir, missing={}, masks=True)
    return BlockState(state.done, {**state.params, "layers": layers}, masks, state.reports, state.inputs)

  def _write(self, done: int, report: list, inputs: np.ndarray | None, arrays: dict) -> None:
    """Block ``done - 1``'s ``arrays`` and ``report``, the ``inputs`` of block ``done``, then the progress."""
    self.dir.mkdir(parents=True, exist_ok=True)
    i = done - 1
    arrays = {**arrays, "report": np.frombuffer(json.dumps(report).encode(), np.uint8)}
    with timed("write"):
      atomic_write(self.dir / f"block_{i:03d}.npz", lambda f: np.savez(f, **arrays))
      if inputs is not None:
        atomic_write(self.dir / "inputs.npy", lambda f: np.save(f, inputs))
    progress = {"identity": self.identity, "done": done}
    atomic_write(self.dir / "progress.json", json.dumps(progress))

  def load(self, params: dict) -> BlockState | None:
    """The saved state on top of the original ``params``, or None if there is nothing to resume (the finished
    blocks of a streamed model stay on disk, read when used)."""
    streamed = is_streamed(params)
    progress_file = self.dir / "progress.json"
    if not progress_file.is_file():
      return None
    try:
      progress = json.loads(progress_file.read_text())
      if progress["identity"] != self.identity:
        raise JaxpruneError(f"{self.dir} holds progress of a different run; remove it or use another --out")
      state = BlockState(0, params, [], [], None)
      for i in range(progress["done"]):
        with np.load(self.dir / f"block_{i:03d}.npz") as z:
          flat = {k: z[k] for k in z.files}
        state.reports.append(json.loads(flat["report"].tobytes()))
        if streamed:
          state.masks.append(None)
          state = self._released(state, i)
        else:
          block = tree.unflatten({k[len("params/"):]: _float(v) for k, v in flat.items() if k.startswith("params/")})
          state.params = {**state.params, "layers": with_layer(state.params["layers"], i, block)}
          state.masks.append({k[len("masks/"):]: v for k, v in flat.items() if k.startswith("masks/")})
      layers, masks, reports = state.params["layers"], state.masks, state.reports
      inputs_file = self.dir / "inputs.npy"
      inputs = np.load(inputs_file) if inputs_file.is_file() else None
    except JaxpruneError:
      raise
    except (OSError, ValueError, KeyError) as err:
      raise JaxpruneError(f"{self.dir}: resume state is damaged ({err}); remove it to start over") from None
    return BlockState(progress["done"], {**params, "layers": layers}, masks, reports, inputs)

  def clear(self) -> None:
    if is_primary():
      shutil.rmtree(self.dir, ignore_errors=True)
