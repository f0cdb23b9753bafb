"""A whole pruning job: the sequential pass with crash-safe progress, then an Orbax checkpoint with metadata."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from jaxprune.data._windows import as_windows
from jaxprune import _tree as tree
from jaxprune.errors import JaxpruneError
from jaxprune.io import _checkpoint as checkpoint
from jaxprune.io._stream import Blocks, is_streamed
from jaxprune.models._config import ModelConfig
from jaxprune.prune._patterns import pattern_name
from jaxprune.prune._resume import ResumeStore
from jaxprune.prune._sequential import BlockState, PruneSpec, kernel_at, run_pass
from jaxprune.prune._targets import select_linears
from jaxprune.prune.solvers import get_solver
from jaxprune.runner._distributed import agree

_VERSIONED = ("jaxprune", "jax", "jaxlib", "flax", "orbax-checkpoint", "transformers", "numpy")


@dataclasses.dataclass
class PruneOutcome:
  """A pruned model: params, keep masks, metadata (spec, per-linear reports, sparsity), seconds, and its config
  when pruning changed the model's shapes (structured removal; None: the input model's config)."""

  params: dict
  masks: dict  # {"layers": [{path: {"kernel": bool (d_in, d_out)}}]}
  metadata: dict
  seconds: float
  config: ModelConfig | None = None


def versions() -> dict[str, str]:
  out = {}
  for name in _VERSIONED:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def mask_tree(masks: list) -> dict:
  """Per-block ``{path: mask}`` -> a tree shaped like the params' pruned kernels. Blocks given as loaders (a
  streamed pass, whose loaders return that tree already) stay loaders: the ``"layers"`` are then a
  :class:`~jaxprune.io._stream.Blocks`."""
  def block_tree(block: dict) -> dict:
    return tree.unflatten({f"{path}/kernel": mask for path, mask in block.items()})

  if any(callable(block) for block in masks):
    return {"layers": Blocks([block if callable(block) else block_tree(block) for block in masks])}
  return {"layers": [block_tree(block) for block in masks]}


def linear_sparsity(reports: list[list[dict]], config: ModelConfig, params) -> float:
  """Measured fraction of exact zeros over all pruned linears (counted by the pass; read from the kernels for
  reports without counts)."""
  zeros = total = 0
  for i, block in enumerate(reports):
    for r in block:
      if "zeros" in r:
        zeros, total = zeros + r["zeros"], total + r["params"]
        continue
      k = np.asarray(kernel_at(params["layers"][i], r["name"]))
      zeros += int(np.sum(k == 0))
      total += k.size
  return zeros / max(total, 1)


def check_prune_spec(spec: PruneSpec) -> PruneSpec:
  """``spec`` if it is a :class:`PruneSpec` (which checks itself when constructed); one-line
  :class:`JaxpruneError` otherwise."""
  if not isinstance(spec, PruneSpec):
    raise JaxpruneError(f"spec must be a jaxprune.PruneSpec(method, pattern, options), got {type(spec).__name__}")
  return spec


def prune(params, calib, *, config: ModelConfig, spec: PruneSpec, out: Path | None = None,
          identity: dict | None = None, batch_size: int = 8, mesh: Mesh | None = None,
          progress: bool = True, targets=None, ignore=None, blocks: tuple[int, int] | None = None,
          reconstruct=None) -> PruneOutcome:
  """Prunes every linear of every block of ``params`` with ``spec``, block by block (see :func:`run_pass`).

  Called as :func:`~jaxprune.perplexity` is: the parameters and the windows, then the model's ``config`` and
  the rest by keyword, e.g. ``prune(params, calib.tokens, config=config, spec=PruneSpec("wanda",
  Unstructured(0.5)))``.

  Args:
    params: the model's parameters.
    calib: int token windows ``[n, seqlen]`` (an array or a :class:`~jaxprune.TokenWindows`); None for magnitude.
    config: the model's :class:`~jaxprune.ModelConfig`.
    spec: method, pattern and options (options may be given as a dict).
    out: with a checkpoint path, progress is kept after every block in ``OUT.partial/`` and a rerun resumes.
    identity: JSON-able description of the run (model, calibration); a resume must match it.
    batch_size, mesh: windows per forward batch, and the devices' mesh.
    reconstruct: a :class:`~jaxprune.retrain.Reconstruction`: after each block is pruned, fit its trainable
      subset to the dense block's outputs (layer-wise reconstruction; needs ``calib``, also for magnitude).
    targets, ignore: module-name patterns of the linears to prune and to leave dense (see
      :func:`~jaxprune.prune._targets.select_linears`); by default every linear is pruned.
    blocks: ``(first, stop)``: prune only blocks ``first <= i < stop`` (the pass ends after block ``stop - 1``;
      the other blocks stay as they are), e.g. to try a slow method on the first blocks of a large model.

  Returns:
    :class:`PruneOutcome`: params, masks, metadata (spec, per-linear reports, measured sparsity) and seconds.
  """
  spec = check_prune_spec(spec)
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise JaxpruneError(f"batch_size must be a positive integer, got {batch_size!r}")
  if calib is not None:
    calib = as_windows(calib, vocab_size=config.vocab_size, max_positions=config.max_position_embeddings,
                       what="calibration windows")
  elif get_solver(spec.method).needs_calibration or reconstruct is not None:
    raise JaxpruneError(f"{spec.method}{' with reconstruction' if reconstruct else ''} needs calibration windows")
  chosen = {}
  if targets or ignore or blocks is not None:
    linears = select_linears(config, targets, ignore)
    if targets or ignore:
      chosen = {"targets": list(_as_list(targets)), "ignore": list(_as_list(ignore))}
    if blocks is not None:
      first, stop = check_blocks(blocks, config.num_layers)
      linears = frozenset((layer, path) for layer, path in linears if first <= layer < stop)
      if not linears:
        raise JaxpruneError(f"blocks {first}:{stop} hold no linear to prune")
      chosen["blocks"] = [first, stop]
    chosen["linears"] = len(linears)
  identity = {**(identity or {}), **chosen}
  if reconstruct is not None:
    identity = {**(identity or {}), "reconstruct": reconstruct.to_json()}
  streamed = is_streamed(params)
  if streamed and out is None:
    raise JaxpruneError("a streamed model is pruned into a checkpoint: pass out=")
  store = ResumeStore(out, {**identity, **spec.to_json()}) if out is not None else None
  state: BlockState | None = store.load(params) if store is not None else None
  agree(0 if state is None else state.done, "the blocks to resume from OUT.partial, which all processes must see")
  if state is not None and progress:
    print(f"resuming from block {state.done} ({store.dir})", file=sys.stderr, flush=True)
  start = time.perf_counter()
  selection = {"linears": linears} if chosen else {}
  state = run_pass(params, config, spec, calib, batch_size=batch_size, mesh=mesh, state=state,
                   on_block=(store.save_and_release if streamed else store.save) if store is not None else None,
                   progress=progress,
                   refine=_refiner(reconstruct), **selection)
  if streamed and store is not None:
    store.finish()  # the last block's write, behind the pass until now
  params = state.params if streamed else jax.tree.map(np.asarray, state.params)
  untouched = config.num_layers - len(state.masks)  # blocks after the last one pruned
  state.masks.extend([{}] * untouched)
  state.reports.extend([[] for _ in range(untouched)])
  seconds = time.perf_counter() - start
  layers = [dict(r) for block in state.reports for r in block]
  meta = {**spec.to_json(), "pattern": pattern_name(spec.pattern), "layers": layers,
          "sparsity": linear_sparsity(state.reports, config, params), "versions": versions(), **identity}
  return PruneOutcome(params, mask_tree(state.masks), meta, seconds)


def check_blocks(blocks, num_layers: int) -> tuple[int, int]:
  """``(first, stop)`` of a block range within ``num_layers`` blocks; a one-line error otherwise."""
  try:
    first, stop = (int(b) for b in blocks)
  except (TypeError, ValueError):
    raise JaxpruneError(f"blocks must be (first, stop), got {blocks!r}") from None
  if not 0 <= first < stop <= num_layers:
    raise JaxpruneError(f"blocks {first}:{stop} is not a range of this model's {num_layers} blocks "
                        f"(0 <= first < stop <= {num_layers})")
  return first, stop


def _as_list(patterns) -> tuple:
  return () if patterns is None else (patterns,) if isinstance(patterns, str) else tuple(patterns)



def _refiner(reconstruct):
  """The ``refine`` hook of :func:`run_pass` for a :class:`~jaxprune.retrain.Reconstruction` (None: none)."""
  if reconstruct is None:
    return None
  from jaxprune.retrain._reconstruct import make_refiner

  return make_refiner(reconstruct)

def save_outcome(outcome: PruneOutcome, out: Path, config: ModelConfig, *, tokenizer=None,
                 overwrite: bool = False) -> Path:
  """Writes the pruned model of ``outcome`` as a jaxprune checkpoint (params, masks, metadata, tokenizer)
  atomically, then drops the resume state of a :func:`prune` run that wrote to ``out``. ``config`` is the input
  model's; ``outcome.config`` replaces it when pruning changed the shapes."""
  path = checkpoint.save_checkpoint(out, outcome.config or config, outcome.params, masks=outcome.masks,
                                    metadata=outcome.metadata, tokenizer=tokenizer, overwrite=overwrite)
  ResumeStore(out, {}).clear()
  return path


def check_out(out: Path, overwrite: bool) -> None:
  """Refuses an output directory that exists and is not a jaxprune checkpoint (before any work starts)."""
  out = Path(out)
  if out.exists() and not checkpoint.is_checkpoint(out):
    raise JaxpruneError(f"output directory {out} exists and is not a jaxprune checkpoint")
  if out.exists() and not overwrite:
    raise JaxpruneError(f"checkpoint {out} exists; pass --overwrite to replace it")
