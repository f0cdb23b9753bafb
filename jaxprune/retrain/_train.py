"""Retraining a pruned model end to end: masked full fine-tuning and PERP's parameter-efficient subsets.

Zimmer et al. 2024, PERP (arXiv:2312.15230): retrain biases, norms, the head or low-rank adapters (LoRA,
MaskLoRA, ScaleLoRA) on the language-modelling loss; Gholami & Omar 2023: fine-tune every weight with the mask
held fixed (``all``). One loop: the :class:`~jaxprune.runner.Runner` computes the loss and gradient of the model
``assemble(trainable, frozen)`` (base weights plus adapters merged on the fly, inside its jitted loss), and a jitted
:func:`~jaxprune.retrain.train_step` applies AdamW to the trainable leaves only and projects pruned weights back to
exactly zero. Batches are split over the mesh's ``data`` axis (parameters replicated). The train state is saved
every ``save_every`` steps (:mod:`jaxprune.retrain._state`); a rerun with the same arguments resumes and ends with
the same parameters bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxprune import _tree as tree
from jaxprune._evaluate import check_windows
from jaxprune.data import tokens_sha256
from jaxprune.errors import JaxpruneError
from jaxprune.models._config import ModelConfig
from jaxprune.retrain import _state
from jaxprune.retrain._adapters import SPARSE_FRACTION, apply, lora_init, merge
from jaxprune.retrain._optim import TrainState, init_state, make_optimizer, project_masked, train_step
from jaxprune.retrain._subsets import (
    TrainSpec, combine, count, get_path, linear_paths, parse_train_spec, partition, trainable_mask, with_biases)
from jaxprune.runner import Runner
from jaxprune.runner._distributed import agree


@dataclasses.dataclass(frozen=True)
class Assemble:
  """The model's parameters from the two halves of a run: ``trainable = {"params", ["adapters"]}`` and
  ``frozen = {"params", "masks"}`` (``None`` marks the leaves the other half holds). Hashable by value: runs with
  equal specs share the runner's compilations."""

  spec: TrainSpec

  def __call__(self, trainable, frozen):
    params = combine(trainable["params"], frozen["params"])
    if self.spec.adapter:
      params = apply(params, trainable["adapters"], frozen["masks"], self.spec)
    return params


@dataclasses.dataclass
class RetrainResult:
  """What :func:`retrain` returns.

  ``params``: the model to use: adapters merged (MaskLoRA/ScaleLoRA keep every zero), or the base weights when
  ``merge=False``; ``config``: its config (linear-bias flags set when ``biases`` added zero biases);
  ``adapters``: the trained adapters, unmerged (None without adapter); ``masks``: per block ``{linear path: bool
  (d_in, d_out)}`` or None; ``losses``: ``(steps · accumulate,)`` float32 training loss per micro-step;
  ``sparsity``: exact zeros over all block linears of ``params``; ``tokens``: windows × seqlen of the whole run;
  ``seconds``: wall time of the training loop of this call (compilation included) and ``tokens_per_second`` its
  tokens over it; ``resumed_from``: the micro-step a saved state resumed from (0: a fresh run).
  """

  params: dict
  config: ModelConfig
  adapters: dict | None
  masks: list | None
  spec: TrainSpec
  trainable_params: int
  total_params: int
  steps: int
  tokens: int
  seconds: float
  tokens_per_second: float
  losses: np.ndarray
  sparsity: float
  merged: bool
  resumed_from: int = 0

  @property
  def trainable_fraction(self) -> float:
    return self.trainable_params / self.total_params if self.total_params else 0.0

  def to_json(self) -> dict:
    return {"train": str(self.spec), "trainable_params": self.trainable_params,
            "total_params": self.total_params, "trainable_fraction": self.trainable_fraction,
            "steps": self.steps, "tokens": self.tokens, "train_seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 1), "sparsity": self.sparsity,
            "merged": self.merged, "resumed_from": self.resumed_from,
            "loss_first": float(self.losses[0]) if self.losses.size else None,
            "loss_last": float(self.losses[-1]) if self.losses.size else None}


def block_masks(masks, num_layers: int) -> list[dict[str, np.ndarray]] | None:
  """Masks as one ``{linear path: bool (d_in, d_out)}`` dict per block, from that form or from a checkpoint's
  mask tree ``{"layers": [{"self_attn": {"q_proj": {"kernel": mask}}, ...}]}`` (None stays None)."""
  if masks is None:
    return None
  layers = masks["layers"] if isinstance(masks, Mapping) and "layers" in masks else masks
  if isinstance(layers, Mapping):  # a list restored as {"0": ..., "1": ...}
    layers = [layers[k] for k in sorted(layers, key=int)]
  if len(layers) != num_layers:
    raise JaxpruneError(f"masks for {len(layers)} blocks, model has {num_layers}")
  out = []
  for block in layers:
    flat = tree.flatten(block)
    out.append({(k[:-len("/kernel")] if k.endswith("/kernel") else k): np.asarray(v, bool) for k, v in flat.items()})
  return out


def linear_sparsity(params: Mapping) -> float:
  """Fraction of exact zeros over the kernels of every block linear."""
  zeros = total = 0
  for block in params["layers"]:
    for path in linear_paths(block):
      k = np.asarray(get_path(block, path)["kernel"])
      zeros += int(np.count_nonzero(k == 0))
      total += k.size
  return zeros / max(total, 1)


def _sparse_linear(params: Mapping) -> str | None:
  """``"block i path (z % zeros)"`` of the first block linear with more than :data:`SPARSE_FRACTION` zeros."""
  for i, block in enumerate(params["layers"]):
    for path in linear_paths(block):
      zeros = float(np.mean(np.asarray(get_path(block, path)["kernel"]) == 0))
      if zeros > SPARSE_FRACTION:
        return f"block {i} {path} ({100 * zeros:.1f} % zeros)"
  return None


def _has_linear_biases(params: Mapping) -> bool:
  return any("bias" in get_path(block, p) for block in params["layers"] for p in linear_paths(block))


def prepare(params, config: ModelConfig, masks, spec: TrainSpec | str, *, mask_from_zeros: bool = False,
            allow_densify: bool = False, merge_adapters: bool = True):
  """``(params, config, masks, spec)`` checked for a run, before any work: zero linear biases added when ``biases``
  trains a model without any (LLaMA, :func:`with_biases`); masks normalised (:func:`block_masks`) or measured from
  the zeros with ``mask_from_zeros``. One-line :class:`JaxpruneError` for: MaskLoRA without masks; ``all`` on a
  sparse model without masks (it would fill the pruned weights); merging plain LoRA into a sparse model without
  ``allow_densify``."""
  spec = parse_train_spec(spec) if isinstance(spec, str) else spec
  if not isinstance(spec, TrainSpec):
    raise JaxpruneError(f"spec must be a TrainSpec or a string such as 'biases,norms', got {type(spec).__name__}")
  masks = block_masks(masks, len(params["layers"]))
  if masks is None and mask_from_zeros:
    masks = [{p: np.asarray(get_path(b, p)["kernel"]) != 0 for p in linear_paths(b)} for b in params["layers"]]
  sparse = _sparse_linear(params) if masks is None else None
  if masks is None and spec.adapter == "masklora":
    raise JaxpruneError("masklora needs the pruning masks and this model has none: prune it first, or take the "
                        "masks from its zero weights (mask_from_zeros / --mask-from-zeros)")
  if masks is None and spec.full and sparse:
    raise JaxpruneError(f"masked fine-tuning ('all') of a sparse model without masks ({sparse}) would fill the "
                        "pruned weights: take the masks from its zeros (mask_from_zeros / --mask-from-zeros)")
  if spec.adapter == "lora" and merge_adapters and not allow_densify and (masks is not None or sparse):
    raise JaxpruneError("merging plain LoRA would densify this sparse model: use masklora or scalelora, keep the "
                        "adapters unmerged, or pass allow_densify (--allow-densify)")
  if "biases" in spec.subsets and not _has_linear_biases(params):
    params, config = with_biases(params, config)
  return params, config, masks, spec


def _window_order(n: int, count_: int, *, seed: int, start: int = 0) -> np.ndarray:
  """Positions ``start .. start + count_ - 1`` of the training order -> window indices: epoch ``e`` is the
  permutation ``default_rng([seed, e]).permutation(n)``."""
  positions = np.arange(start, start + count_)
  epochs = positions // n
  perms = {int(e): np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(epochs)}
  return np.array([perms[int(e)][p % n] for e, p in zip(epochs, positions)], np.int64)


def check_budget(windows: int, seqlen: int, *, steps: int, batch: int, accumulate: int = 1,
                 epochs: bool = False) -> None:
  """Refuses (one line) a run that needs more than the ``windows`` training windows once, unless ``epochs``;
  ``batch``: windows per micro-step after rounding to the mesh (:meth:`~jaxprune.runner.Runner.batches`)."""
  need = steps * accumulate * batch
  if need > windows and not epochs:
    raise JaxpruneError(f"{steps} steps x {accumulate * batch} windows x {seqlen} tokens = {need * seqlen} training "
                        f"tokens exceed the {windows * seqlen} of the training text ({windows} windows): train "
                        "fewer steps, or repeat the text (epochs / --epochs)")


def _check_int(name: str, value, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise JaxpruneError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


@dataclasses.dataclass
class _Run:
  """The parts of one run that the loop and the state files share."""

  runner: Runner
  batches: Any
  optimizer: Any
  update: Callable
  frozen: dict
  assemble: Assemble
  identity: dict
  micro_steps: int
  batch: int
  remat: bool


def _initial(params, masks, spec: TrainSpec, *, seed: int, runner: Runner):
  """``(trainable, frozen, mask tree)`` of a fresh run, on the devices; trainable arrays are copies (the step
  donates them)."""
  mask = trainable_mask(params, spec)
  train_params, frozen_params = partition(params, mask)
  trainable = {"params": train_params}
  if spec.adapter:
    trainable["adapters"] = lora_init(params, spec, key=jax.random.key(seed))
  frozen = {"params": frozen_params, "masks": None if masks is None else jax.tree.map(jnp.asarray, masks)}
  trainable = runner.replicate(jax.tree.map(lambda x: jnp.array(x, copy=True), trainable))
  return trainable, runner.replicate(frozen), mask


def _project(trainable, frozen):
  """Masked fine-tuning: pruned kernels back to exactly 0.0 after every update."""
  return {**trainable, "params": project_masked(trainable["params"], frozen["masks"])}


@functools.lru_cache(maxsize=32)
def _optimizer(lr: float, steps: int, warmup: float, weight_decay: float, clip: float | None, accumulate: int,
               masked: bool):
  """``(optimizer, update)``: AdamW on the trainable leaves, and the jitted :func:`train_step` that applies it to
  given ``(loss, grads)`` (projecting pruned kernels to zero when ``masked``), donating the old state. Cached, so
  runs with the same settings share one compilation per shape."""
  optimizer = make_optimizer(None, lr=lr, steps=steps, warmup=warmup, weight_decay=weight_decay, clip=clip,
                             accumulate=accumulate)
  step = train_step(_given, optimizer, project=_project if masked else None)
  return optimizer, jax.jit(step, donate_argnums=0)


def _given(trainable, frozen, loss_and_grads):
  """The ``loss_and_grad`` of :func:`train_step` when the runner has computed them already."""
  return loss_and_grads


def retrain(params, config: ModelConfig, masks, spec: TrainSpec | str, windows, *, steps: int, batch_size: int = 8,
            lr: float = 5e-4, warmup: float = 0.1, weight_decay: float = 0.0, clip: float | None = 1.0,
            accumulate: int = 1, remat: bool = False, epochs: bool = False, seed: int = 0,
            merge_adapters: bool = True, allow_densify: bool = False, mask_from_zeros: bool = False,
            mesh: Mesh | None = None, state_dir: Path | str | None = None, save_every: int = 50,
            identity: dict | None = None, progress: bool = True,
            on_step: Callable[[int, dict], None] | None = None) -> RetrainResult:
  """Retrains ``params`` on the language-modelling loss over ``windows``, training only ``spec``'s subset.

  Args:
    params, config: the (pruned) model; params are not modified.
    masks: the pruning masks (``True`` = kept), as one ``{linear path: bool (d_in, d_out)}`` dict per block or a
      checkpoint's mask tree; None for a dense model (see ``mask_from_zeros``). ``all`` keeps the pruned weights
      at exactly 0.0 after every step; MaskLoRA restricts its update to the kept weights.
    spec: a :class:`TrainSpec` or its text, e.g. ``"all"``, ``"biases,norms"``, ``"masklora:16"``. ``biases`` on a
      model without linear biases adds zero ones (:func:`with_biases`; the result's config says so).
    windows: int token windows ``(n, seqlen)``; step ``s`` trains on ``batch`` of them (``batch_size`` rounded up
      to a multiple of the mesh's ``data`` axis), in a seeded order that reshuffles each epoch.
    steps: optimizer updates; each takes ``accumulate`` batches (``optax.MultiSteps``). More windows than
      ``windows`` holds are refused unless ``epochs``.
    lr, warmup, weight_decay, clip: AdamW with PERP's defaults (:func:`make_optimizer`).
    remat: recompute block activations in the backward pass (memory).
    merge_adapters: fold the adapters into the weights at the end; plain LoRA into a sparse model needs
      ``allow_densify``. False keeps ``params`` as the base weights and the trained ``adapters`` beside them.
    mesh: batches split over its ``data`` axis, parameters replicated.
    state_dir: save the train state there every ``save_every`` steps and at the end; an existing state of the same
      run (same ``identity`` and settings) is resumed. ``identity``: JSON-able description of the model and data.
    on_step: called as ``on_step(step, {"loss", "grad_norm"})`` after every micro-step (1-based step).

  Returns:
    :class:`RetrainResult`.
  """
  params, config, masks, spec = prepare(params, config, masks, spec, mask_from_zeros=mask_from_zeros,
                                        allow_densify=allow_densify, merge_adapters=merge_adapters)
  steps, accumulate = _check_int("steps", steps), _check_int("accumulate", accumulate)
  batch_size, save_every = _check_int("batch_size", batch_size), _check_int("save_every", save_every)
  windows = check_windows(windows, config, "training windows")
  n, seq = windows.shape
  runner = Runner(config, mesh=mesh, batch_size=batch_size)
  batches = runner.batches(batch_size, seq)
  batch, micro_steps = batches.batch, steps * accumulate
  check_budget(n, seq, steps=steps, batch=batch, accumulate=accumulate, epochs=epochs)
  masked = spec.full and masks is not None
  optimizer, update = _optimizer(lr, steps, warmup, weight_decay, clip, accumulate, masked)
  trainable, frozen, mask = _initial(params, masks, spec, seed=seed, runner=runner)
  if masked:
    trainable = _project(trainable, frozen)
  settings = {"spec": str(spec), "alpha": spec.alpha, "targets": list(spec.targets), "steps": steps, "batch": batch,
              "seqlen": seq, "lr": lr, "warmup": warmup, "weight_decay": weight_decay, "clip": clip,
              "accumulate": accumulate, "seed": seed, "windows": n, "windows_sha256": tokens_sha256(windows),
              "masks": masks is not None, "params": [list(np.shape(x)) for x in jax.tree.leaves(params)]}
  run = _Run(runner, batches, optimizer, update, frozen, Assemble(spec),
             {**settings, **(identity or {})}, micro_steps, batch, remat)
  state, losses, start = _resume_or_init(run, trainable, state_dir)
  if start and progress:
    print(f"resuming from step {start} of {micro_steps} ({state_dir})", file=sys.stderr, flush=True)
  begin = time.perf_counter()
  state, losses = _loop(run, state, losses, start, windows, seed=seed, state_dir=state_dir, save_every=save_every,
                        progress=progress, desc=f"retrain {spec}", on_step=on_step)
  seconds = time.perf_counter() - begin
  final = jax.device_get(state.trainable)
  base = combine(final["params"], jax.device_get(frozen["params"]))
  adapters = final.get("adapters")
  out = base
  if adapters is not None and merge_adapters:
    out = merge(base, adapters, masks, spec, allow_densify=allow_densify)
  out = jax.tree.map(np.asarray, out)
  n_train, total, _ = count(params, mask, adapters=adapters)
  trained = (micro_steps - start) * batch * seq
  return RetrainResult(out, config, adapters, masks, spec, n_train, total, steps, micro_steps * batch * seq,
                       seconds, trained / seconds if seconds > 0 else 0.0, np.asarray(losses, np.float32),
                       linear_sparsity(out), adapters is None or merge_adapters, start)


def _resume_or_init(run: _Run, trainable, state_dir) -> tuple[TrainState, list[float], int]:
  state = init_state(trainable, run.optimizer)
  restored, losses, step = None, [], 0
  if _state.has_state(state_dir):
    restored, progress = _state.load_state(state_dir, state, run.identity)
    step, losses = int(progress["step"]), list(progress["losses"])
    if not 0 <= step <= run.micro_steps or progress.get("position") != step * run.batch:
      raise JaxpruneError(f"{state_dir}: train state is corrupt (step {step}, data position "
                          f"{progress.get('position')}); remove it to start over")
  agree(step, f"the step to resume from {state_dir}, which all processes must see")
  if restored is None:
    return state, [], 0
  return run.runner.replicate(jax.tree.map(jnp.asarray, restored)), losses, step


def _loop(run: _Run, state: TrainState, losses: list[float], start: int, windows: np.ndarray, *, seed: int,
          state_dir, save_every: int, progress: bool, desc: str, on_step) -> tuple[TrainState, list[float]]:
  """Micro-steps ``start .. micro_steps - 1``; state saved every ``save_every`` steps and at the end."""
  seq = windows.shape[1]
  bar = tqdm(total=run.micro_steps, initial=start, desc=desc, unit="step", disable=not progress)
  tick, done = time.perf_counter(), 0
  for s in range(start, run.micro_steps):
    rows = windows[_window_order(len(windows), run.batch, seed=seed, start=s * run.batch)]
    tokens, weights, _ = next(run.batches.chunks(rows))
    loss, grads = run.runner.value_and_grad(state.trainable, run.frozen, tokens, weights, assemble=run.assemble,
                                            remat=run.remat)
    state, metrics = run.update(state, run.frozen, (loss, grads))
    metrics = {k: float(v) for k, v in metrics.items()}
    if not math.isfinite(metrics["loss"]):
      raise JaxpruneError(f"training loss is {metrics['loss']} at step {s + 1}: lower the learning rate")
    losses.append(metrics["loss"])
    done += 1
    bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                    tok_s=f"{done * run.batch * seq / (time.perf_counter() - tick):.0f}")
    bar.update()
    if state_dir is not None and ((s + 1) % save_every == 0 or s + 1 == run.micro_steps):
      _state.save_state(state_dir, state, {"identity": run.identity, "step": s + 1,
                                           "position": (s + 1) * run.batch, "losses": losses})
    if on_step is not None:
      on_step(s + 1, metrics)
  bar.close()
  return state, losses
