"""Retraining after pruning: PERP's parameter-efficient subsets and adapters, and masked full fine-tuning.

Zimmer et al. 2024, "PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs" (arXiv:2312.15230, github
ZIB-IOL/PERP); Gholami & Omar 2023 (magnitude pruning + fine-tuning with the mask held fixed). :func:`retrain`
runs the whole loop (through the runner, data-parallel, resumable); :func:`make_refiner` adds layer-wise
reconstruction to the pruning pass. The building blocks are pure functions for someone else's jitted training
loop: which leaves train (:func:`parse_train_spec`,
:func:`trainable_mask`, :func:`partition`), adapters (:func:`lora_init`, :func:`apply`, :func:`merge`), the
optimizer (:func:`make_optimizer`), the zero-keeping projection (:func:`project_masked`) and a generic step
(:func:`train_step`). Masks: ``True`` = kept, kernel layout ``(d_in, d_out)``, one ``{linear path: mask}`` dict per
block.
"""
from jaxprune.retrain._adapters import (
    ADAPTER_PARAMS, SPARSE_FRACTION, Masks, apply, effective_kernel, lora_init, merge)
from jaxprune.retrain._optim import (
    TrainState, init_state, lr_schedule, make_optimizer, project_masked, train_step)
from jaxprune.retrain._subsets import (
    ADAPTER_KINDS, DEFAULT_ALPHA, DEFAULT_RANK, DEFAULT_TARGETS, SUBSETS, TrainSpec, combine, count, linear_paths,
    measured_masks, parse_train_spec, partition, trainable_mask, with_biases)
from jaxprune.retrain._reconstruct import Reconstruction, make_refiner, parse_reconstruction, reconstruct_block
from jaxprune.retrain._train import (
    Assemble, RetrainResult, block_masks, check_budget, linear_sparsity, prepare, retrain)

__all__ = [
    "ADAPTER_KINDS", "ADAPTER_PARAMS", "DEFAULT_ALPHA", "DEFAULT_RANK", "DEFAULT_TARGETS", "Masks",
    "SPARSE_FRACTION", "SUBSETS", "TrainSpec", "TrainState", "apply", "combine", "count", "effective_kernel",
    "init_state", "linear_paths", "lora_init", "lr_schedule", "make_optimizer", "measured_masks", "merge",
    "parse_train_spec", "partition", "project_masked", "train_step", "trainable_mask", "with_biases",
    "Assemble", "RetrainResult", "block_masks", "check_budget", "linear_sparsity", "prepare", "retrain",
    "Reconstruction", "make_refiner", "parse_reconstruction", "reconstruct_block",
]
