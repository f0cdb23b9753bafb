"""The layer-by-layer pruning pass (SparseGPT/Wanda/ADMM), in exactly one place.

For each decoder block in order: run the calibration activations through the block, capturing the input of
every group of linears; accumulate their statistics; prune every linear of the block with the solver; re-run the
block **with pruned weights** to produce the next block's inputs. All linears of a block are pruned from the same
(dense-block) inputs, as the reference implementations do.

With ``PruneSpec(true_sequential=True)`` the groups of a block are pruned in order instead (LLaMA: q/k/v, o,
gate/up, down), each from inputs computed with the groups before it already pruned (GPTQ's and SparseGPT's
"true sequential" order). Each group's inputs are computed once, from the inputs kept of the groups before
it, and the block output from the kept residual stream entering the MLP (``layers.MID``) and the inputs of its
last linear, so a block costs one forward with pruned weights instead of a dense and a pruned one; the price is
memory: the inputs of every group of the current block stay on the devices.

Compilation: the block forward, the statistics step, each solver and its ``prepare`` step (SparseGPT's and
ADMM's factorisations, done once per input group and shared by its linears) are jitted with the block's shape as the
only static information, so N identical blocks trigger one compilation each. Memory: the calibration activations of
one block ``(n, seqlen, hidden)`` plus one block's statistics, whatever the depth.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxprune import _tree as tree
from jaxprune._memory import retained_memory
from jaxprune.errors import JaxpruneError
from jaxprune.io._stream import is_streamed, layer_abstract, prefetch, split, with_layer
from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig
from jaxprune.models._convert import from_hf_layout, to_hf_layout
from jaxprune.models._layers import MID
from jaxprune.prune._patterns import Pattern
from jaxprune.prune.solvers import check_options, get_solver, reconstruction_error
from jaxprune.prune.solvers._base import solver_jit
from jaxprune.prune._stats import accumulate, accumulate_sharded, init_stats
from jaxprune.runner import Batches, Runner, as_input
from jaxprune.runner._batches import fetched_ahead, gathered, weighted
from jaxprune.runner._distributed import fetch


@dataclasses.dataclass(frozen=True)
class PruneSpec:
  """What to do to every linear: ``method`` (a key of ``SOLVERS``), ``pattern``, solver hyper-parameters.

  Checked when constructed (a known method, a pattern, options the solver takes, true-sequential only for a
  method that uses calibration), with one-line :class:`~jaxprune.JaxpruneError` s; ``hparams`` may be given as a
  dict and is kept as sorted ``(name, value)`` pairs, so that a spec is hashable.
  """

  method: str
  pattern: Pattern
  hparams: tuple[tuple[str, Any], ...] = ()
  true_sequential: bool = False

  def __post_init__(self):
    hparams = check_options(self.method, self.pattern, self.hparams)
    if not isinstance(self.true_sequential, bool):
      raise JaxpruneError(f"true_sequential must be True or False, got {self.true_sequential!r}")
    if self.true_sequential and not get_solver(self.method).needs_calibration:
      raise JaxpruneError(f"true_sequential needs calibration; {self.method} uses none")
    object.__setattr__(self, "hparams", hparams)

  def to_json(self) -> dict:
    return {"method": self.method, "pattern": repr(self.pattern), "hparams": dict(self.hparams),
            "true_sequential": self.true_sequential}


@dataclasses.dataclass
class BlockState:
  """Where the pass stands after ``done`` blocks: params so far, masks, reports, inputs of block ``done``."""

  done: int
  params: dict
  masks: list  # per finished block: {path: kernel-layout bool mask}
  reports: list  # per finished block: list of per-linear dicts
  inputs: np.ndarray | None  # (n, seqlen, hidden) float32; None for methods without calibration


def kernel_at(block_params: dict, path: str) -> jax.Array:
  """The kernel ``(d_in, d_out)`` of the linear at ``path`` (e.g. ``"mlp/down_proj"``) in a block."""
  return tree.get(block_params, f"{path}/kernel")


def _set_kernel(block_params: dict, path: str, value) -> dict:
  return tree.set_at(block_params, f"{path}/kernel", value)


def block_linears(config: ModelConfig, block_params: dict) -> dict[str, tuple[str, ...]]:
  """Tap name -> paths of the linears present in this block (removed sublayers have none)."""
  return M.present_linears(config, block_params)


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnames=("stats",))
def _accumulate(stats: dict, taps: dict, weights, *, mesh):
  """``stats[name]`` plus the tokens of ``taps[name]`` ``(b, t, d)`` for every name of ``stats``."""
  add = accumulate if mesh is None else functools.partial(accumulate_sharded, mesh=mesh)
  return {name: add(s, weighted(taps[name], weights)) for name, s in stats.items()}


def jitted_solver(spec: PruneSpec):
  """The solver of ``spec`` with its pattern and hyper-parameters bound, jitted once (one compile per shape)."""
  return _jitted_solver(spec.method, spec.pattern, spec.hparams)


@functools.lru_cache(maxsize=None)
def _jitted_solver(method: str, pattern: Pattern, hparams: tuple):
  return solver_jit()(functools.partial(get_solver(method).solve, pattern=pattern, **dict(hparams)))


def jitted_prepare(spec: PruneSpec):
  """The ``prepare`` step of the solver of ``spec`` (see :class:`~jaxprune.prune.solvers.SolverSpec`) with the
  options it names bound, jitted once (one compile per input width), or ``None`` if the solver has none."""
  return _jitted_prepare(spec.method, spec.hparams)


@functools.lru_cache(maxsize=None)
def _jitted_prepare(method: str, hparams: tuple):
  prepare = get_solver(method).prepare
  if prepare is None:
    return None
  named = inspect.signature(prepare).parameters
  return solver_jit()(functools.partial(prepare, **{k: v for k, v in hparams if k in named}))


def check_spec(spec: PruneSpec, config: ModelConfig, params) -> None:
  """Traces the solver of ``spec`` abstractly (no computation) on every distinct linear shape of the model, so
  that a pattern or hyper-parameter it cannot take raises its one-line :class:`JaxpruneError` before any work."""
  solver = jitted_solver(spec)
  needs_gram = get_solver(spec.method).needs_gram
  blocks = [layer_abstract(params["layers"], i) for i in range(len(params["layers"]))]
  shapes = {kernel_at(block, path).shape for block in blocks
            for paths in block_linears(config, block).values() for path in paths}
  prepare = jitted_prepare(spec)
  for d_in, d_out in sorted(shapes):
    stats = None if spec.method == "magnitude" else jax.eval_shape(functools.partial(init_stats, d_in, gram=needs_gram))
    prepared = {} if prepare is None or stats is None else {"prepared": jax.eval_shape(prepare, stats)}
    jax.eval_shape(functools.partial(solver, **prepared), jax.ShapeDtypeStruct((d_out, d_in), jnp.float32), stats)


def _statistics(runner: Runner, block_params, inputs, batches: Batches, groups, *, modes, needs_gram: bool):
  widths = {tap: kernel_at(block_params, paths[0]).shape[0] for tap, paths in groups.items()}
  stats = {tap: init_stats(d, gram=needs_gram) for tap, d in widths.items()}
  for h, weights, _ in batches.chunks(inputs):
    stats = _add_batch(runner, block_params, as_input(h, block_params), weights, stats, batches,
                       names=tuple(widths), modes=modes)[0]
  return {tap: _counted(s, inputs) for tap, s in stats.items()}


def _add_batch(runner: Runner, block_params, h, weights, stats: dict, batches: Batches, *, names, modes, keep=(),
               given=None) -> tuple[dict, dict]:
  """``(stats, kept)``: ``stats`` (per tap of ``names``, in that order) plus one batch's taps, and the taps
  ``keep`` of that batch. Squared norms alone (no Gram) on one device (no mesh, or a mesh of one device, as the
  command line's on a machine with one) are summed inside the block's program (:meth:`Runner.tap_sums`);
  otherwise the taps are computed, then added by the statistics step."""
  if (batches.mesh is None or batches.mesh.size == 1) and all(s.gram is None for s in stats.values()):
    sums, kept = runner.tap_sums(block_params, h, weights, {n: s.sq_norms for n, s in stats.items()}, names=names,
                                 keep=keep, modes=modes, given=given)
    return {n: s._replace(sq_norms=sums[n]) for n, s in stats.items()}, kept
  taps = runner.taps(block_params, h, names=tuple(dict.fromkeys(names + tuple(keep))), modes=modes, given=given)
  return _accumulate(stats, taps, weights, mesh=batches.mesh), {name: taps[name] for name in keep}


def _counted(stats, inputs: np.ndarray):
  """``stats`` with ``count`` = the real (unpadded) tokens of ``inputs`` ``(n, seq, ...)``."""
  return stats._replace(count=jnp.float32(inputs.shape[0] * inputs.shape[1]))


def _solve(spec: PruneSpec, kernel, stats, row_mesh: Mesh | None, prepared=None):
  """The solver on ``kernel`` ``(d_in, d_out)`` cast to float32 (solvers always run in float32, whatever the
  model's dtype), with what its ``prepare`` step computed from ``stats`` if it has one (``prepared``):
  ``(kernel, mask, error, energy, zeros)``, the kernel and mask in the kernel layout, the kernel in its own dtype,
  the solver's error, the dense output's energy (:func:`_output_energy`) and the count of zeros in the new kernel.

  Four compiled programs per linear shape: the layout change in, the solver, the energy, the layout change out.
  One program doing all four holds more at once than the solver alone: at LLaMA-2-7B's ``down_proj``, XLA's
  temporaries were 1.87 GB against the solver's 1.28 GB, and the SparseGPT step of
  ``experiments/scale/stream7b.py`` peaked at 4.43 GB of resident memory against 3.87 GB with four programs."""
  w = _solver_layout(kernel)
  if row_mesh is not None:
    w = jax.device_put(w, NamedSharding(row_mesh, P("model", None)))
  result = jitted_solver(spec)(w, stats, **({} if prepared is None else {"prepared": prepared}))
  energy = _output_energy(w, stats)
  new, mask, zeros = _kernel_layout(result.w, result.mask, dtype=kernel.dtype)
  return new, mask, result.error, energy, zeros


@jax.jit
def _solver_layout(kernel):
  """The kernel ``(d_in, d_out)`` as the solvers take it: float32 ``(d_out, d_in)``."""
  return to_hf_layout(kernel).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _kernel_layout(w, mask, *, dtype):
  """A solver's weights and mask ``(d_out, d_in)`` back in the kernel layout, the weights in ``dtype``, and the
  count of zeros in them. The weights are cast and counted in the solver's layout, then transposed: XLA fuses a
  cast and a count that follow the transpose into one slow strided loop: 1.78 s against 1.01 s for a block of
  LLaMA-2-7B in bfloat16 (``experiments/scale/kernel_layout.py``)."""
  narrow = w.astype(dtype)
  return from_hf_layout(narrow), from_hf_layout(mask), jnp.sum(narrow == 0)


@solver_jit()
def _output_energy(w, stats) -> jax.Array:
  """``tr(W G Wᵀ)`` of the float32 ``(d_out, d_in)`` weights the solver was given: the dense output's energy on the
  statistics, the unit of a relative reconstruction error (``G = I`` without statistics). (The same sum over the
  kernel as stored, transposed and in bfloat16, is many times slower on a CPU.)"""
  return reconstruction_error(w, jnp.zeros_like(w), stats)


def _prune_group(block_params, paths, stats, spec: PruneSpec, row_mesh, masks: dict, reports: list) -> dict:
  """Prunes the linears ``paths`` (one input group) from ``stats``, the solver's ``prepare`` step (SparseGPT's or
  ADMM's factorisation) done once for all of them; adds to ``masks``/``reports`` (sparsity, the solver's error
  ``tr(ΔW G ΔWᵀ)`` and that error relative to the dense output's energy)."""
  prepare = jitted_prepare(spec)
  prepared = None if prepare is None or stats is None else prepare(stats)
  for path in paths:
    kernel, mask, error, energy, zeros = _solve(spec, kernel_at(block_params, path), stats, row_mesh, prepared)
    block_params = _set_kernel(block_params, path, kernel)
    masks[path] = fetch(mask)
    error, energy = float(error), float(energy)
    reports.append({"name": path, "sparsity": float(1.0 - np.mean(masks[path])), "error": error,
                    "relative_error": error / energy if energy > 0 else 0.0,
                    "params": int(kernel.size), "zeros": int(zeros)})
  return block_params


def _row_mesh(runner: Runner):
  """The mesh whose ``model`` axis splits the rows of a solver's weights, if any."""
  mesh = runner.mesh
  return mesh if mesh is not None and "model" in mesh.shape else None


def _selected(config: ModelConfig, block_params: dict, select) -> dict[str, tuple[str, ...]]:
  """:func:`block_linears` restricted to the paths in ``select`` (None: all); groups left empty are dropped."""
  groups = block_linears(config, block_params)
  if select is None:
    return groups
  chosen = {tap: tuple(p for p in paths if p in select) for tap, paths in groups.items()}
  return {tap: paths for tap, paths in chosen.items() if paths}


def _take(block_params: dict, release: bool) -> dict:
  """The block to work on. With ``release``, the caller hands it over: its dict is emptied, so that each dense
  kernel is freed as soon as its pruned one replaces it (a block of a 7B model is 0.4 GB in bfloat16)."""
  if not release:
    return block_params
  own = jax.tree.map(lambda leaf: leaf, block_params)
  block_params.clear()
  return own


def prune_block(block_params, inputs, runner: Runner, spec: PruneSpec, *, modes, select=None,
                release: bool = False) -> tuple[dict, dict, list]:
  """Prunes every linear of one block (or those whose paths are in ``select``) from the dense block's inputs
  ``(n, seq, hidden)`` (``None`` for a method without calibration: magnitude). Returns ``(new block params,
  {path: mask}, reports)``. ``release``: ``block_params`` is emptied (see :func:`_take`)."""
  block_params = _take(block_params, release)
  groups = _selected(runner.config, block_params, select)
  stats = {tap: None for tap in groups}
  if inputs is not None:
    stats = _statistics(runner, block_params, inputs, runner.batches(*inputs.shape[:2]), groups, modes=modes,
                        needs_gram=get_solver(spec.method).needs_gram)
  masks, reports = {}, []
  for tap, paths in groups.items():  # each group's statistics dropped once its linears are pruned
    block_params = _prune_group(block_params, paths, stats.pop(tap), spec, _row_mesh(runner), masks, reports)
  return block_params, masks, reports


def _batch(given: dict[str, list], b: int) -> dict:
  return {name: per_batch[b] for name, per_batch in given.items()}


def prune_block_sequential(block_params, inputs, runner: Runner, spec: PruneSpec, *, modes, select=None,
                           release: bool = False,
                           into: np.ndarray | None = None) -> tuple[dict, dict, list, np.ndarray]:
  """Prunes the groups of one block in order, each from inputs computed with the groups before it pruned
  (``release``: as :func:`prune_block`; ``into``: an array the block outputs may overwrite, see
  :func:`~jaxprune.runner._batches.gathered`).

  The inputs of every group but the first (which depends on the block input alone) and the residual stream
  entering the MLP stay on the devices, batch by batch, until the block is done: about
  ``(3·hidden + intermediate) / hidden`` times the block's input activations. Returns ``(new block params,
  {path: mask}, reports, block outputs (n, seq, hidden))``.
  """
  block_params = _take(block_params, release)
  config = runner.config
  needs_gram = get_solver(spec.method).needs_gram
  order = M.tap_order(runner.static, modes)
  batches = runner.batches(*inputs.shape[:2])
  chunks = list(batches.chunks(inputs))
  given: dict[str, list] = {}  # tap -> its inputs, one device array per batch
  masks, reports = {}, []
  for g, (tap, paths) in enumerate(_selected(config, block_params, select).items()):
    stats = {tap: init_stats(kernel_at(block_params, paths[0]).shape[0], gram=needs_gram)}
    # The residual stream entering the MLP is final once every group the block computes before it is pruned: it
    # is kept from the step of the first group after it, so that the block output needs no attention again.
    keep_mid = MID not in given and order.index(tap) > order.index(MID)
    keep = (tap,) * (g > 0) + (MID,) * keep_mid
    values, mids = [], []
    for b, (h, weights, _) in enumerate(chunks):
      stats, kept = _add_batch(runner, block_params, as_input(h, block_params), weights, stats, batches,
                               names=(tap,), modes=modes, keep=keep, given=_batch(given, b))
      values.append(kept.get(tap))
      mids.append(kept.get(MID))
    if keep_mid:
      given[MID] = mids
    if g:
      given[tap] = values
    block_params = _prune_group(block_params, paths, _counted(stats[tap], inputs), spec, _row_mesh(runner), masks,
                                reports)
  outputs = ((runner.block(block_params, as_input(h, block_params), modes=modes, given=_batch(given, b)), real)
             for b, (h, _, real) in enumerate(chunks))
  return block_params, masks, reports, gathered(fetched_ahead(outputs), len(inputs), into=into)


def run_pass(params, config: ModelConfig, spec: PruneSpec, calib: np.ndarray | None, *, batch_size: int = 8,
             mesh: Mesh | None = None, state: BlockState | None = None,
             on_block: Callable[[BlockState], BlockState | None] | None = None, progress: bool = True,
             refine: Callable | None = None, linears=None) -> BlockState:
  """Prunes all blocks of ``params``; ``calib`` ``(n, seqlen)`` int32 token windows (None for magnitude).

  ``state`` resumes a pass from a finished block; ``on_block(state)`` is called after every block (the
  checkpointing hook of :mod:`jaxprune.prune._job`); when it returns a state (the same, with the finished
  block replaced by a loader of where it was written: streaming), the pass goes on from that one.
  ``params["layers"]`` may be a :class:`~jaxprune.io._stream.Blocks` (blocks read from disk when used).
  ``refine(i, dense block, pruned block, {path: mask}, inputs, runner=, modes=) -> (block, report)`` changes each
  pruned block before its outputs feed the next one (layer-wise reconstruction,
  :func:`jaxprune.retrain.make_refiner`; it needs calibration inputs, also for magnitude); the report's keys join
  the block's per-linear reports. ``linears``: a set of ``(layer, path)`` to prune (default: every linear; see
  ``select_linears`` in :mod:`jaxprune.prune._targets`); the others stay dense, and the pass ends after the last
  block holding one of them. Returns the final :class:`BlockState`.

  Host memory the pass frees is kept for its next requests when the model is in memory, not streamed
  (:func:`~jaxprune._memory.retained_memory`).

  The calibration activations of block ``i + 2`` are written over those of block ``i`` (two host arrays serve
  the whole pass: :func:`~jaxprune.runner._batches.gathered`), so ``on_block`` must be done with a state's
  ``inputs`` when it is next called (the checkpointing hooks wait for their writes then).
  """
  with retained_memory(by_default=not is_streamed(params)):  # see jaxprune._memory
    needs_calib = spec.method != "magnitude"
    needs_inputs = needs_calib or refine is not None
    if needs_inputs and calib is None:
      raise JaxpruneError(f"{spec.method}{' with reconstruction' if refine else ''} needs calibration data")
    check_spec(spec, config, params)
    runner = Runner(config, mesh=mesh, batch_size=batch_size)
    if state is None:
      inputs = None
      if needs_inputs:
        rest = split(params)[0]  # read now if lazy (a streamed model), and dropped: the pass holds no embeddings
        inputs = runner.map_windows(lambda tokens: runner.embed(rest, tokens), calib)
        del rest
      state = BlockState(0, params, [], [], inputs)
    stop = config.num_layers if linears is None else max(layer for layer, _ in linears) + 1
    spare = None  # the activations of the block before the last one: memory for the next block's
    bar = tqdm(total=stop, initial=state.done, desc=f"prune {spec.method}", unit="block", disable=not progress)
    for i in range(state.done, stop):
      start = time.perf_counter()
      modes = config.sublayer_modes(i)
      block_params = runner.place(state.params["layers"][i])
      prefetch(state.params["layers"], i + 1)  # read while block i is pruned
      select = None if linears is None else frozenset(path for layer, path in linears if layer == i)
      if needs_calib and spec.true_sequential:
        new_block, masks, reports, inputs = prune_block_sequential(block_params, state.inputs, runner, spec,
                                                                   modes=modes, select=select, release=refine is None,
                                                                   into=spare)
      else:
        new_block, masks, reports = prune_block(block_params, state.inputs if needs_calib else None, runner, spec,
                                                modes=modes, select=select, release=refine is None)
        inputs = state.inputs
      if refine is not None:
        new_block, report = refine(i, block_params, new_block, masks, state.inputs, runner=runner, modes=modes)
        for r in reports:
          r.update(report)
      if needs_inputs and (refine is not None or not (needs_calib and spec.true_sequential)):
        inputs = runner.map_windows(lambda h: runner.block(new_block, as_input(h, new_block), modes=modes),
                                    state.inputs, into=spare)
      layers = with_layer(state.params["layers"], i, jax.tree.map(fetch, new_block))  # the devices hold one block
      for r in reports:
        r["layer"] = i
      spare = state.inputs if inputs is not state.inputs else spare
      state = BlockState(i + 1, {**state.params, "layers": layers}, state.masks + [masks],
                         state.reports + [reports], inputs)
      bar.set_postfix(seconds=f"{time.perf_counter() - start:.1f}",
                      error=f"{sum(r['error'] for r in reports):.3g}")
      bar.update()
      if on_block is not None:
        state = on_block(state) or state
    bar.close()
    return state
