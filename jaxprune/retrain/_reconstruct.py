"""Layer-wise reconstruction (PERP, Zimmer et al. 2024, arXiv:2312.15230): right after a block is pruned, fit its
trainable subset so that the pruned block reproduces the dense block's outputs on the calibration inputs.

Per block ``ℓ``, with ``X̃`` the calibration activations entering it (computed by the already pruned and
reconstructed blocks before it), minimise ``mean_{b,t,d} (block_pruned(X̃) − block_dense(X̃))²`` over the subset
(biases, norms, MaskLoRA or ScaleLoRA adapters, or every kept weight with ``all``) with AdamW, ``batch_size``
windows a step, in a seeded order. Adapters are merged into the block at the end (every pruned zero kept), so the
next block sees the reconstructed one. Memory: the block's inputs and its dense outputs ``(n, seqlen, hidden)``
on the host, one block's parameters and optimizer state on the devices.

:func:`make_refiner` gives the hook that :func:`jaxprune.prune._sequential.run_pass` calls after each block.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import JaxpruneError
from jaxprune.retrain._adapters import lora_init, merge
from jaxprune.retrain._optim import init_state
from jaxprune.retrain._subsets import TrainSpec, combine, parse_train_spec, partition, trainable_mask
from jaxprune.retrain._train import Assemble, _check_int, _optimizer, _window_order
from jaxprune.runner import Runner


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """Settings of layer-wise reconstruction: the trainable ``spec`` of each block and AdamW's ``steps``, ``lr``,
  ``warmup``, ``weight_decay``, ``clip``; ``batch_size`` calibration windows a step; ``seed`` of the window order
  and of the adapters' initialisation."""

  spec: TrainSpec
  steps: int = 50
  lr: float = 5e-4
  batch_size: int = 8
  warmup: float = 0.1
  weight_decay: float = 0.0
  clip: float | None = 1.0
  seed: int = 0

  def __post_init__(self):
    spec = self.spec
    outside = [s for s in spec.subsets if s in ("head", "embeddings")]
    if outside:
      raise JaxpruneError(f"reconstruction fits a block's own parameters; {outside[0]!r} is outside the blocks")
    if spec.adapter == "lora":
      raise JaxpruneError("reconstruction merges its adapters into each pruned block; plain lora would densify it "
                          "(use masklora or scalelora)")
    _check_int("reconstruction steps", self.steps)
    _check_int("reconstruction batch size", self.batch_size)
    if not self.lr > 0:
      raise JaxpruneError(f"reconstruction lr must be positive, got {self.lr}")

  def to_json(self) -> dict:
    return {"train": str(self.spec), "steps": self.steps, "lr": self.lr, "batch_size": self.batch_size,
            "warmup": self.warmup, "weight_decay": self.weight_decay, "clip": self.clip, "seed": self.seed}


def parse_reconstruction(text: str, **options) -> Reconstruction:
  """``"biases,norms,masklora:16"`` and the options of :class:`Reconstruction` -> a checked :class:`Reconstruction`."""
  return Reconstruction(parse_train_spec(text), **options)


@dataclasses.dataclass(frozen=True)
class BlockAssemble:
  """One block's parameters from the halves of a reconstruction (see :class:`~jaxprune.retrain.Assemble`; the
  halves hold a one-block model ``{"layers": [block]}``)."""

  spec: TrainSpec

  def __call__(self, trainable, frozen):
    return Assemble(self.spec)(trainable, frozen)["layers"][0]


def _relative_error(runner: Runner, block, inputs: np.ndarray, targets: np.ndarray, modes) -> float:
  """``Σ (block(X̃) − Y)² / Σ Y²`` over all calibration windows, float64 on the host."""
  out = runner.map_windows(lambda h: runner.block(block, h, modes=modes), inputs)
  diff = out.astype(np.float64) - targets
  return float(np.sum(diff * diff) / max(np.sum(targets.astype(np.float64) ** 2), 1e-30))


def reconstruct_block(layer: int, dense_block, pruned_block, masks: dict, inputs: np.ndarray, *, runner: Runner,
                      modes, recon: Reconstruction) -> tuple[dict, dict]:
  """Fits ``recon.spec``'s subset of ``pruned_block`` to the outputs of ``dense_block`` on ``inputs``
  ``(n, seqlen, hidden)``; ``masks``: ``{linear path: bool (d_in, d_out)}`` of the block.

  Returns ``(block, report)``: the block with adapters merged and pruned weights still exactly zero, and
  ``{"reconstruct_error_before", "reconstruct_error_after"}``: the relative output error of the pruned and of the
  reconstructed block on all of ``inputs``.
  """
  spec = recon.spec
  targets = runner.map_windows(lambda h: runner.block(dense_block, h, modes=modes), inputs)
  model = {"layers": [jax.device_get(pruned_block)]}
  mask = trainable_mask(model, spec)
  train_params, frozen_params = partition(model, mask)
  trainable = {"params": train_params}
  if spec.adapter:
    trainable["adapters"] = lora_init(model, spec, key=jax.random.fold_in(jax.random.key(recon.seed), layer))
  block_masks = [{p: jnp.asarray(m, bool) for p, m in masks.items()}]
  frozen = runner.replicate({"params": frozen_params, "masks": block_masks})
  optimizer, update = _optimizer(recon.lr, recon.steps, recon.warmup, recon.weight_decay, recon.clip, 1, spec.full)
  state = init_state(runner.replicate(jax.tree.map(lambda x: jnp.array(x, copy=True), trainable)), optimizer)
  batches = runner.batches(recon.batch_size, inputs.shape[1])
  order = _window_order(len(inputs), recon.steps * batches.batch, seed=recon.seed)
  assemble = BlockAssemble(spec)
  for s in range(recon.steps):
    rows = order[s * batches.batch:(s + 1) * batches.batch]
    h, weights, _ = next(batches.chunks(inputs[rows]))
    y, _, _ = next(batches.chunks(targets[rows]))
    loss, grads = runner.block_value_and_grad(state.trainable, frozen, h, y, weights, modes=modes, assemble=assemble)
    state, _ = update(state, frozen, (loss, grads))
  final = jax.device_get(state.trainable)
  block = combine(final["params"], jax.device_get(frozen_params))
  if spec.adapter:
    block = merge(block, final["adapters"], [masks], spec)
  block = jax.tree.map(np.asarray, block)["layers"][0]
  report = {"reconstruct_error_before": _relative_error(runner, pruned_block, inputs, targets, modes),
            "reconstruct_error_after": _relative_error(runner, block, inputs, targets, modes)}
  return block, report


def make_refiner(recon: Reconstruction) -> Callable:
  """The ``refine`` hook of :func:`~jaxprune.prune._sequential.run_pass`: ``refine(layer, dense_block,
  pruned_block, masks, inputs, runner=, modes=) -> (block, report)`` by :func:`reconstruct_block`."""

  def refine(layer, dense_block, pruned_block, masks, inputs, *, runner, modes):
    return reconstruct_block(layer, dense_block, pruned_block, masks, inputs, runner=runner, modes=modes,
                             recon=recon)

  return refine
