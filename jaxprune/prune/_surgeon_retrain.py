"""Retraining after every shot of LLM Surgeon (van der Ouderaa et al. 2024, arXiv:2312.17244, "interleaved
low-rank first-order updates").

The reference code (github Qualcomm-AI-research/llm-surgeon, ``surgeon.py --lora``) fine-tunes LoRA adapters on the
language-modelling loss **after every shot, the last one included**, and absorbs them into the weights before the
next shot, so that the next shot's curvature and costs see the retrained model (it then runs one more, longer LoRA
on the final model, which here is ``jaxprune retrain``). This module does the same with the retraining machinery
of :mod:`jaxprune.retrain`: one :func:`~jaxprune.retrain.retrain` call per shot on a trainable subset that keeps the
pruned weights exactly 0.0 (``masklora:R``, ``scalelora:R``, ``biases``, ``norms``, ``head``, ``embeddings`` or
masked ``all``), merged back into the weights. Plain ``lora`` is refused: merged, it fills every pruned weight.

Shot ``i`` trains ``steps`` AdamW steps of ``batch`` windows on the next ``steps · batch`` rows of the training
windows (from row ``(i − 1) · steps · batch``, wrapping around), each row once, with seed ``seed + i`` (adapter
init and order). The mean loss over those rows is measured before and after. The pass works on the uncompacted
model (removed units are rows and columns of zeros under ``False`` masks, whose adapters' contribution the mask
cancels); adapters take each linear's own shape, so a model that already has per-layer widths works as it is.
Biases of whole removed output rows are set back to 0 after training (the surgeon counts them as removed).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import time
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from jaxprune import _tree as tree
from jaxprune.errors import JaxpruneError
from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig
from jaxprune.retrain._subsets import TrainSpec, parse_train_spec
from jaxprune.runner import Runner

DEFAULT_TRAIN = "masklora:16"


@dataclasses.dataclass(frozen=True)
class Retraining:
  """What LLM Surgeon retrains after every shot.

  Attributes:
    train: trainable subsets, a :class:`~jaxprune.retrain.TrainSpec` or its text (``"masklora:16"``,
      ``"scalelora:8"``, ``"norms"``, ``"biases,norms"``, ``"all"``); plain ``lora`` is refused.
    steps: AdamW steps per shot (:func:`~jaxprune.retrain.retrain`'s schedule: 10 % warm-up, linear decay).
    lr: peak learning rate.
    batch_size: training windows per step (rounded up to the mesh's ``data`` axis).
    seed: shot ``i`` retrains with seed ``seed + i``.
  """

  train: TrainSpec | str = DEFAULT_TRAIN
  steps: int = 20
  lr: float = 5e-4
  batch_size: int = 2
  seed: int = 0

  @property
  def spec(self) -> TrainSpec:
    return self.train if isinstance(self.train, TrainSpec) else parse_train_spec(self.train)

  def to_json(self) -> dict:
    spec = self.spec
    return {"train": str(spec), "alpha": spec.alpha, "targets": list(spec.targets), "steps": self.steps,
            "lr": self.lr, "batch_size": self.batch_size, "seed": self.seed}


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def check_retraining(retraining: Retraining) -> Retraining:
  """``retraining`` if valid (with its spec parsed); else a one-line :class:`JaxpruneError`."""
  if not isinstance(retraining, Retraining):
    raise JaxpruneError(f"retraining must be a Retraining, got {type(retraining).__name__}")
  if not isinstance(retraining.train, (TrainSpec, str)):
    raise JaxpruneError(f"retraining subsets must be a TrainSpec or a string such as 'masklora:16', "
                        f"got {type(retraining.train).__name__}")
  spec = retraining.spec  # unknown subsets: parse_train_spec's one-line error
  if spec.adapter == "lora":
    raise JaxpruneError("plain lora between shots would fill the pruned weights when merged; use masklora:R or "
                        "scalelora:R (their merge keeps every zero)")
  if not _is_int(retraining.steps) or retraining.steps < 1:
    raise JaxpruneError(f"retraining steps must be an integer >= 1, got {retraining.steps!r}")
  if not _is_int(retraining.batch_size) or retraining.batch_size < 1:
    raise JaxpruneError(f"retraining batch size must be an integer >= 1, got {retraining.batch_size!r}")
  lr = retraining.lr
  if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 < lr < math.inf:
    raise JaxpruneError(f"retraining learning rate must be a finite number > 0, got {lr!r}")
  if not _is_int(retraining.seed):
    raise JaxpruneError(f"retraining seed must be an integer, got {retraining.seed!r}")
  return dataclasses.replace(retraining, train=spec)


def _batch(config: ModelConfig, retraining: Retraining, seqlen: int, mesh: Mesh | None) -> int:
  """Windows per step after rounding to the mesh (as :func:`~jaxprune.retrain.retrain` rounds them)."""
  return Runner(config, mesh=mesh, batch_size=retraining.batch_size).batches(retraining.batch_size, seqlen).batch


def check_training(params, config: ModelConfig, retraining: Retraining, windows, *,
                   mesh: Mesh | None = None) -> np.ndarray:
  """The training ``windows`` ``(n, seqlen)`` as int32, checked against the model before the first shot: one-line
  errors for windows the model cannot read, fewer rows than one shot uses, and ``biases`` on a model whose linears
  have none (adding zero biases would change its config in the middle of the pass)."""
  from jaxprune.data._windows import as_windows
  from jaxprune.retrain._subsets import trainable_mask

  if windows is None:
    raise JaxpruneError("retraining between shots needs training windows")
  windows = as_windows(windows, vocab_size=config.vocab_size, max_positions=config.max_position_embeddings,
                       what="training windows")
  spec = retraining.spec
  if "biases" in spec.subsets and not any("bias" in tree.get(block, path) for block in params["layers"]
                                          for paths in M.present_linears(config, block).values() for path in paths):
    raise JaxpruneError("retraining 'biases' between shots would add zero biases to every linear of this model and "
                        "change its config mid-pass; train norms or an adapter (masklora:R, scalelora:R) instead")
  trainable_mask(params, spec)  # a subset that selects nothing: one line
  need = retraining.steps * _batch(config, retraining, windows.shape[1], mesh)
  if need > len(windows):
    raise JaxpruneError(f"retraining {retraining.steps} steps x {need // retraining.steps} windows per shot needs "
                        f"{need} training windows, got {len(windows)}: give more text or train fewer steps")
  return windows


def shot_rows(shot: int, per_shot: int, n: int) -> np.ndarray:
  """Rows of the ``n`` training windows that shot ``shot`` (1-based) trains on: the next ``per_shot``, wrapping."""
  return (np.arange(per_shot) + (shot - 1) * per_shot) % n


def mean_loss(runner: Runner, params, windows: np.ndarray) -> float:
  """Mean next-token loss of ``params`` over ``windows`` ``(n, seqlen)`` (every window has ``seqlen − 1``
  targets, so this is the token mean)."""
  placed = runner.place(params)
  return float(np.mean(runner.map_windows(lambda t: runner.window_losses(placed, t), windows)))


def zero_removed_biases(params, masks: list) -> dict:
  """``params`` with the bias of every whole removed output row (a kernel column of ``False``) at 0."""
  layers = list(params["layers"])
  for i, block_masks in enumerate(masks):
    for path, keep in block_masks.items():
      node = tree.get(layers[i], path)
      rows = np.asarray(keep).any(axis=0)
      if "bias" in node and not rows.all():
        bias = np.asarray(node["bias"])
        layers[i] = tree.set_at(layers[i], path, {**node, "bias": np.where(rows, bias, np.zeros((), bias.dtype))})
  return {**params, "layers": layers}


def retrain_shot(state, config: ModelConfig, retraining: Retraining, windows: np.ndarray, *, mesh: Mesh | None = None,
                 state_dir: Path | None = None, progress: bool = True):
  """The :class:`~jaxprune.prune._surgeon_pass.SurgeonState` after retraining shot ``state.done``: adapters (or
  the subset) trained on that shot's rows (:func:`shot_rows`) and merged, pruned weights exactly 0.0, and a
  ``"retrain"`` entry in the shot's report (losses before and after on those rows, seconds). ``state_dir`` keeps
  the train state (resumes a retraining killed mid-way)."""
  from jaxprune.prune._surgeon_pass import SurgeonState
  from jaxprune.retrain import retrain

  start = time.perf_counter()
  shot, seqlen = state.done, windows.shape[1]
  batch = _batch(config, retraining, seqlen, mesh)
  rows = windows[shot_rows(shot, retraining.steps * batch, len(windows))]
  runner = Runner(config, mesh=mesh, batch_size=retraining.batch_size)
  before = mean_loss(runner, state.params, rows)
  result = retrain(state.params, config, state.masks, retraining.spec, rows, steps=retraining.steps,
                   batch_size=retraining.batch_size, lr=retraining.lr, seed=retraining.seed + shot, mesh=mesh,
                   state_dir=state_dir, save_every=max(1, retraining.steps // 4), identity={"surgeon_shot": shot},
                   progress=progress)
  if result.config != config:
    raise JaxpruneError("retraining between shots changed the model's config; train norms or an adapter instead")
  params = zero_removed_biases(result.params, state.masks)
  after = mean_loss(runner, params, rows)
  report = {"train": str(retraining.spec), "steps": retraining.steps, "batch": batch, "seqlen": int(seqlen),
            "first_row": int((shot - 1) * len(rows) % len(windows)), "rows": int(len(rows)),
            "tokens": int(rows.size), "loss_before": before, "loss_after": after,
            "trainable_params": result.trainable_params, "resumed_from": result.resumed_from,
            "train_seconds": round(result.seconds, 3), "seconds": round(time.perf_counter() - start, 3)}
  last = {**state.reports[-1], "retrain": report}
  return SurgeonState(shot, params, state.masks, state.reports[:-1] + [last])


def pending(state, retraining: Retraining | None) -> bool:
  """Whether the last finished shot of ``state`` still awaits its retraining."""
  return retraining is not None and state.done >= 1 and "retrain" not in state.reports[-1]
