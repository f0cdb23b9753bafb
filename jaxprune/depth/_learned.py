"""Learned recovery: the bias and low-rank adapters of removed units trained with the retraining machinery.

Siddiqui et al. 2024 ("A deeper look at depth pruning of LLMs", Sec. 5) emulate a removed block or sublayer by a
lightweight additive bias or low-rank linear adapter that is *trained*; :mod:`jaxprune.depth._recovery` has the
closed forms of the same adapters. Two training signals, each a :class:`~jaxprune.depth.Recovery` ``fit``:

* ``mse``: emulate the removed unit's update. Unit by unit, in layer order on the stream that the earlier
  replacements produce (as the closed-form fit), with ``x`` the stream entering the unit: minimise
  ``mean_{b,t,d} (x + adapter(x) - unit(x))²``, the least-squares problem the closed forms solve (the bias's
  optimum is the mean update; lowrank's, for ``damp = 0``, the reduced-rank regression). The loss and gradient
  are :meth:`~jaxprune.runner.Runner.block_value_and_grad` of the half-block whose removed sublayer is in the
  adapter's mode, so the adapter is trained exactly as the model will run it.
* ``lm``: the calibration next-token cross-entropy of the whole pruned model, every adapter of the removal at
  once, through :meth:`~jaxprune.runner.Runner.value_and_grad` with the adapters inserted into the frozen
  parameters by a hashable ``assemble``. Only the adapters are in the trainable tree; every model weight is an
  argument of the step and is never updated.

Both use :func:`jaxprune.retrain.make_optimizer` (AdamW, the linear schedule with 10 % warm-up, gradients clipped
to global norm 1, no weight decay) and :func:`jaxprune.retrain.train_step`. Initialisation ``zero``: bias 0,
``up`` 0 and ``down`` ``N(0, 1/d)`` (the LoRA convention: the adapter starts as the skip, yet ``up`` gets a
gradient); ``closed``: the closed-form fit. Step ``s`` trains on calibration batch ``order[s]``, a seeded
permutation of the batches per epoch.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxprune.depth._recovery import Recovery
from jaxprune.errors import JaxpruneError
from jaxprune.models._config import ModelConfig
from jaxprune.retrain import init_state, make_optimizer, train_step
from jaxprune.runner import Runner


def zero_adapter(width: int, recovery: Recovery, *, key: jax.Array) -> dict:
  """An adapter whose output is 0: ``{"bias": 0 (d,)}``, plus ``down ~ N(0, 1/d)`` ``(d, R)`` and ``up = 0``
  ``(R, d)`` for lowrank; float32."""
  adapter = {"bias": jnp.zeros((width,), jnp.float32)}
  if recovery.kind == "lowrank":
    adapter["down"] = jax.random.normal(key, (width, recovery.rank), jnp.float32) / np.sqrt(width).astype(np.float32)
    adapter["up"] = jnp.zeros((recovery.rank, width), jnp.float32)
  return adapter


def _given(trainable, frozen, loss_and_grads):
  """The ``loss_and_grad`` of :func:`~jaxprune.retrain.train_step` when the runner has computed them already."""
  return loss_and_grads


@functools.lru_cache(maxsize=16)
def _optimizer(lr: float, steps: int):
  """``(optimizer, jitted update)``; cached, so that fits with the same settings share one compilation."""
  optimizer = make_optimizer(None, lr=lr, steps=steps)
  return optimizer, jax.jit(train_step(_given, optimizer), donate_argnums=0)


def batch_order(batches: int, steps: int, *, seed: int) -> np.ndarray:
  """Batch index of each of ``steps`` steps: epoch ``e`` is ``default_rng([seed, e]).permutation(batches)``."""
  epochs = -(-steps // batches)
  return np.concatenate([np.random.default_rng([seed, e]).permutation(batches) for e in range(epochs)])[:steps]


def _train(runner: Runner, adapter, frozen, steps: int, lr: float, loss_and_grad) -> tuple[dict, list[float]]:
  """``steps`` AdamW updates of ``adapter`` (a pytree of arrays); ``loss_and_grad(trainable, s)`` gives step
  ``s``'s ``(loss, grads)``. Returns the trained tree on the host (numpy) and the loss of every step."""
  optimizer, update = _optimizer(float(lr), int(steps))
  trainable = runner.replicate(jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), adapter))
  state = init_state(trainable, optimizer)
  losses = []
  for s in range(steps):
    state, metrics = update(state, frozen, loss_and_grad(state.trainable, s))
    losses.append(metrics["loss"])
  losses = [float(x) for x in jax.device_get(losses)]
  if not np.all(np.isfinite(losses)):
    raise JaxpruneError(f"recovery training diverged (loss {losses[-1]}): lower the learning rate")
  return jax.tree.map(np.asarray, jax.device_get(state.trainable)), losses


@dataclasses.dataclass(frozen=True)
class _Half:
  """A half-block's parameters from its adapter alone: ``{name: trainable}`` (hashable, for the runner's jit)."""

  name: str

  def __call__(self, trainable, frozen):
    return {self.name: trainable}


def train_mse(runner: Runner, inputs: list, targets: list, weights: list, adapter: dict, *, modes: tuple[str, str],
              name: str, recovery: Recovery, seed: int) -> tuple[dict, list[float]]:
  """Trains ``adapter`` so that the half-block ``{name: adapter}`` in ``modes`` maps ``inputs`` to ``targets``.

  ``inputs``, ``targets``: matching lists of calibration batches ``(b, t, d)`` on the devices (the stream entering
  the removed unit and the unit's output), ``weights``: their ``(b,)`` window weights. ``runner``: built for a
  config whose ``adapter_rank`` is the adapter's rank. Returns the trained adapter (numpy) and the MSE per step.
  """
  order = batch_order(len(inputs), recovery.steps, seed=seed)
  assemble = _Half(name)

  def loss_and_grad(trainable, s):
    b = order[s]
    return runner.block_value_and_grad(trainable, None, inputs[b], targets[b], weights[b], modes=modes,
                                       assemble=assemble)

  return _train(runner, adapter, None, recovery.steps, recovery.lr, loss_and_grad)


@dataclasses.dataclass(frozen=True)
class _Insert:
  """The model's parameters from the frozen ones and the trainable adapters, one per layer of ``layers``, put at
  ``layers[i][name]`` (hashable, for the runner's jit)."""

  layers: tuple[int, ...]
  name: str

  def __call__(self, trainable, frozen):
    blocks = list(frozen["layers"])
    for i, adapter in zip(self.layers, trainable):
      blocks[i] = {**blocks[i], self.name: adapter}
    return {**frozen, "layers": blocks}


def train_lm(params, config: ModelConfig, tokens: np.ndarray, *, adapters: dict[int, dict], name: str,
             recovery: Recovery, batch_size: int, mesh: Mesh | None, seed: int) -> tuple[dict[int, dict], list[float]]:
  """Trains the ``adapters`` ``{layer: adapter}`` of the pruned model ``(params, config)`` (which holds them at
  ``params["layers"][layer][name]``) on the mean next-token loss of calibration ``tokens`` ``(n, t)``, every other
  parameter frozen. Returns the trained adapters (numpy) and the loss of every step."""
  layers = tuple(sorted(adapters))
  frozen_layers = [{k: v for k, v in block.items() if not (i in adapters and k == name)}
                   for i, block in enumerate(params["layers"])]
  runner = Runner(config, mesh=mesh, batch_size=batch_size)
  frozen = runner.place({**params, "layers": frozen_layers})
  batches = list(runner.batches(*tokens.shape).chunks(np.asarray(tokens, np.int32)))
  order = batch_order(len(batches), recovery.steps, seed=seed)
  assemble = _Insert(layers, name)

  def loss_and_grad(trainable, s):
    toks, w, _ = batches[order[s]]
    return runner.value_and_grad(trainable, frozen, toks, w, assemble=assemble)

  trained, losses = _train(runner, tuple(adapters[i] for i in layers), frozen, recovery.steps, recovery.lr,
                           loss_and_grad)
  return dict(zip(layers, trained)), losses
