"""A whole pruning job: the sequential pass with crash-safe progress, then an Orbax checkpoint with metadata."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from jaxprune.errors import JaxpruneError
from jaxprune.io import _checkpoint as checkpoint
from jaxprune.models._config import ModelConfig
from jaxprune.prune._patterns import pattern_name
from jaxprune.prune._resume import ResumeStore
from jaxprune.prune._sequential import BlockState, PruneSpec, kernel_at, run_pass

_VERSIONED = ("jaxprune", "jax", "jaxlib", "flax", "orbax-checkpoint", "transformers", "numpy")


@dataclasses.dataclass
class PruneOutcome:
  params: dict
  masks: dict  # {"layers": [{path: {"kernel": bool (d_in, d_out)}}]}
  metadata: dict
  seconds: float


def versions() -> dict[str, str]:
  out = {}
  for name in _VERSIONED:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def mask_tree(masks: list[dict[str, np.ndarray]]) -> dict:
  """Per-block ``{path: mask}`` -> a tree shaped like the params' pruned kernels."""
  layers = []
  for block in masks:
    tree: dict = {}
    for path, mask in block.items():
      node = tree
      for part in path.split("/"):
        node = node.setdefault(part, {})
      node["kernel"] = mask
    layers.append(tree)
  return {"layers": layers}


def linear_sparsity(reports: list[list[dict]], config: ModelConfig, params) -> float:
  """Measured fraction of exact zeros over all pruned linears."""
  zeros = total = 0
  for i, block in enumerate(reports):
    for r in block:
      k = np.asarray(kernel_at(params["layers"][i], r["name"]))
      zeros += int(np.sum(k == 0))
      total += k.size
  return zeros / max(total, 1)


def prune(params, config: ModelConfig, spec: PruneSpec, calib: np.ndarray | None, *, out: Path | None = None,
          identity: dict | None = None, batch_size: int = 8, mesh: Mesh | None = None,
          progress: bool = True) -> PruneOutcome:
  """Runs the pass; with ``out``, progress is kept after every block and a rerun resumes (see ``resume``)."""
  store = ResumeStore(out, {**(identity or {}), **spec.to_json()}) if out is not None else None
  state: BlockState | None = store.load(params) if store is not None else None
  if state is not None and progress:
    print(f"resuming from block {state.done} ({store.dir})", flush=True)
  start = time.perf_counter()
  state = run_pass(params, config, spec, calib, batch_size=batch_size, mesh=mesh, state=state,
                   on_block=store.save if store is not None else None, progress=progress)
  params = jax.tree.map(np.asarray, state.params)
  seconds = time.perf_counter() - start
  layers = [dict(r) for block in state.reports for r in block]
  meta = {**spec.to_json(), "pattern": pattern_name(spec.pattern), "layers": layers,
          "sparsity": linear_sparsity(state.reports, config, params), "versions": versions(), **(identity or {})}
  return PruneOutcome(params, mask_tree(state.masks), meta, seconds)


def save(outcome: PruneOutcome, out: Path, config: ModelConfig, *, tokenizer=None, overwrite: bool = False) -> None:
  """Writes the checkpoint atomically, then drops the resume state."""
  checkpoint.save_checkpoint(out, config, outcome.params, masks=outcome.masks, metadata=outcome.metadata,
                             tokenizer=tokenizer, overwrite=overwrite)
  ResumeStore(out, {}).clear()


def check_out(out: Path, overwrite: bool) -> None:
  """Refuses an output directory that exists and is not a jaxprune checkpoint (before any work starts)."""
  out = Path(out)
  if out.exists() and not checkpoint.is_checkpoint(out):
    raise JaxpruneError(f"output directory {out} exists and is not a jaxprune checkpoint")
  if out.exists() and not overwrite:
    raise JaxpruneError(f"checkpoint {out} exists; pass --overwrite to replace it")
