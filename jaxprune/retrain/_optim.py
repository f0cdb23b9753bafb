"""The optimizer of PERP retraining and masked fine-tuning, the projection that keeps pruned weights at zero, and a
generic pure train step.

Reference defaults (Zimmer et al. 2024, PERP, github ZIB-IOL/PERP, via the Hugging Face ``Trainer``): AdamW
(β = 0.9, 0.999, ε = 1e-8) at lr 5e-4, weight decay 0, a linear schedule with ``ceil(0.1·steps)`` warm-up steps
(``warmup_ratio=0.1``) decaying to 0 at ``steps``, gradients clipped to global norm 1.0 (``max_grad_norm``),
optional gradient accumulation. Weight decay, when used, skips biases and norm parameters as the ``Trainer`` does
(here: every leaf of rank < 2).

Nothing is jitted here: the caller jits the step.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune.errors import JaxpruneError
from jaxprune.retrain._adapters import ADAPTER_PARAMS, Masks
from jaxprune.retrain._subsets import TrainSpec, get_path, set_path, trainable_mask

TRAIN, FROZEN = "train", "frozen"


def lr_schedule(lr: float, *, steps: int, warmup: float = 0.1) -> optax.Schedule:
  """Hugging Face's linear schedule: ``lr·t/w`` for ``t < w``, then ``lr·max(0, (steps − t)/(steps − w))``, with
  ``w = ceil(warmup·steps)`` (the first update uses lr 0 when ``w > 0``, as in PyTorch)."""
  _check_positive(lr=lr, steps=steps)
  if not 0.0 <= warmup < 1.0:
    raise JaxpruneError(f"warmup is a fraction of the steps in [0, 1), got {warmup}")
  w = math.ceil(warmup * steps)

  def schedule(count):
    t = jnp.asarray(count).astype(jnp.float32)
    up = t / jnp.float32(max(1, w))
    down = jnp.maximum(jnp.float32(0.0), (jnp.float32(steps) - t) / jnp.float32(max(1, steps - w)))
    return jnp.float32(lr) * jnp.where(t < w, up, down)

  return schedule


def _check_positive(**values) -> None:
  for name, value in values.items():
    if not value > 0:
      raise JaxpruneError(f"{name} must be positive, got {value}")


def _labels(spec_or_mask: TrainSpec | Any) -> Callable[[Any], Any] | Any:
  """multi_transform labels: from a bool pytree, or (for a spec) a function of the optimized tree: a params tree
  labelled by the spec, an adapters tree as trainable, or ``{"params": ..., "adapters": ...}`` holding both."""
  if not isinstance(spec_or_mask, TrainSpec):
    return jax.tree.map(lambda m: TRAIN if m else FROZEN, spec_or_mask)
  spec = spec_or_mask

  def of_params(tree):  # adapter leaves (an adapters tree given alone) always train
    return jax.tree_util.tree_map_with_path(
        lambda kp, m: TRAIN if m or str(getattr(kp[-1], "key", "")) in ADAPTER_PARAMS else FROZEN,
        trainable_mask(tree, spec, strict=False))

  def labels(tree):
    if isinstance(tree, Mapping) and tree and set(tree) <= {"params", "adapters"}:
      return {k: of_params(v) if k == "params" else jax.tree.map(lambda _: TRAIN, v) for k, v in tree.items()}
    return of_params(tree)

  return labels


def make_optimizer(spec_or_mask: TrainSpec | Any = None, *, lr: float = 5e-4, steps: int, warmup: float = 0.1,
                   weight_decay: float = 0.0, clip: float | None = 1.0,
                   accumulate: int = 1) -> optax.GradientTransformation:
  """AdamW with :func:`lr_schedule`, global-norm clipping and optional accumulation, on the trainable leaves only.

  ``spec_or_mask``: a :class:`TrainSpec`, a bool pytree of the optimized tree's structure (True = trainable), or
  None (everything trains). Frozen leaves go to ``optax.set_to_zero()``: zero updates and **no** optimizer state
  (``EmptyState``; the moments of the trainable leaves hold ``MaskedNode`` there). Clipping measures the norm of
  the trainable gradients only. ``accumulate > 1`` wraps the trainable branch in ``optax.MultiSteps``: the
  update (and the schedule) advance every ``accumulate`` calls, on the mean gradient. ``clip`` None or 0: off.
  """
  _check_positive(lr=lr, steps=steps, accumulate=accumulate)
  if weight_decay < 0 or (clip is not None and clip < 0):
    raise JaxpruneError(f"weight_decay and clip must be >= 0, got {weight_decay} and {clip}")
  decay = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)  # noqa: E731
  inner = optax.adamw(lr_schedule(lr, steps=steps, warmup=warmup), b1=0.9, b2=0.999, eps=1e-8,
                      weight_decay=weight_decay, mask=decay)
  if clip:
    inner = optax.chain(optax.clip_by_global_norm(clip), inner)
  if accumulate > 1:
    inner = optax.MultiSteps(inner, every_k_schedule=accumulate).gradient_transformation()
  if not (spec_or_mask is None or (isinstance(spec_or_mask, TrainSpec) and spec_or_mask.full)):
    inner = optax.multi_transform({TRAIN: inner, FROZEN: optax.set_to_zero()}, _labels(spec_or_mask))
  return _standard_promotion(inner)


def _standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``tx`` with its own arithmetic traced under standard dtype promotion: optax's Adam bias correction computes
  ``b1 ** count`` (Python float, int32 count), which ``jax_numpy_dtype_promotion="strict"`` rejects. A scoped
  setting; nothing global changes."""

  def init(params):
    with jax.numpy_dtype_promotion("standard"):
      return tx.init(params)

  def update(updates, state, params=None, **extra):
    with jax.numpy_dtype_promotion("standard"):
      return tx.update(updates, state, params, **extra)

  return optax.GradientTransformationExtraArgs(init, update)


def project_masked(params: Mapping, masks: Masks) -> dict:
  """``params`` with every masked kernel set to ``where(mask, kernel, 0)``: after each optimizer step of masked
  fine-tuning, pruned weights are exactly 0.0 whatever the optimizer (momentum, weight decay) did.

  ``masks``: per block ``{linear path: bool (d_in, d_out)}``. Kernels that are ``None`` (frozen, see
  :func:`jaxprune.retrain.partition`) are skipped; every other leaf is the same object.
  """
  blocks = params["layers"]
  if len(masks) != len(blocks):
    raise JaxpruneError(f"masks for {len(masks)} blocks, model has {len(blocks)}")
  layers = []
  for i, (block, block_masks) in enumerate(zip(blocks, masks)):
    for path, mask in block_masks.items():
      linear = get_path(block, path)
      kernel = linear.get("kernel")
      if kernel is None:
        continue
      if mask.shape != kernel.shape:
        raise JaxpruneError(f"mask of block {i} {path} has shape {mask.shape}, kernel is {kernel.shape}")
      block = set_path(block, path, {**linear, "kernel": jnp.where(mask, kernel, jnp.zeros((), kernel.dtype))})
    layers.append(block)
  return {**params, "layers": layers}


class TrainState(NamedTuple):
  """What a train step carries: the ``trainable`` pytree (e.g. ``{"params": trainable params, "adapters": ...}``),
  the optimizer state of exactly those leaves, and the int32 count of steps taken (micro-steps when
  accumulating). Frozen leaves are not in it: they are an argument of the step."""

  trainable: Any
  opt_state: optax.OptState
  step: jax.Array


def init_state(trainable: Any, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(trainable, optimizer.init(trainable), jnp.zeros((), jnp.int32))


def train_step(loss_and_grad: Callable[[Any, Any, Any], tuple[jax.Array, Any]],
               optimizer: optax.GradientTransformation, *,
               project: Callable[[Any, Any], Any] | None = None) -> Callable:
  """A pure ``step(state, frozen, batch) -> (state, metrics)``.

  ``loss_and_grad(trainable, frozen, batch) -> (loss, grads)`` (grads of ``trainable``'s structure) comes from the
  caller, e.g. ``jax.value_and_grad`` of a loss of ``combine(trainable, frozen)``. ``frozen`` is passed in, not
  carried, so its arrays are never copied or recomputed. ``project(trainable, frozen) -> trainable`` runs after
  every update; masked fine-tuning passes ``lambda t, f: {**t, "params": project_masked(t["params"], f["masks"])}``
  with the masks in ``frozen``. ``metrics``: ``{"loss", "grad_norm"}`` (norm before clipping).
  """

  def step(state: TrainState, frozen: Any, batch: Any) -> tuple[TrainState, dict]:
    loss, grads = loss_and_grad(state.trainable, frozen, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    if project is not None:
      trainable = project(trainable, frozen)
    return TrainState(trainable, opt_state, state.step + 1), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  return step
