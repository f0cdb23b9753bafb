"""Post-training pruning of linear layers: patterns, masks, calibration statistics, solvers.

Everything here is a pure function over arrays; nothing knows about models. Conventions: weights
``(d_out, d_in)`` (HF layout), masks ``True`` = kept, statistics are raw sums over tokens (see
:mod:`jaxprune.prune._stats`), ``NM(n, m)`` keeps ``n`` of every ``m`` (see :mod:`jaxprune.prune._patterns`).
"""
from jaxprune.prune._masks import keep_mask, layer_mask, nm_mask, num_pruned, pattern_mask, unstructured_mask
from jaxprune.prune._patterns import NM, Pattern, Unstructured, parse_pattern
from jaxprune.prune.solvers import (
    SOLVERS, ADMMFactor, SolverResult, SolverSpec, SparseGPTFactor, admm, admm_prepare, admm_update, get_solver,
    magnitude, reconstruction_error, sparsegpt, sparsegpt_prepare, wanda)
from jaxprune.prune._stats import Stats, accumulate, accumulate_sharded, init_stats

__all__ = [
    "ADMMFactor", "NM", "Pattern", "SOLVERS", "SolverResult", "SolverSpec", "SparseGPTFactor", "Stats",
    "Unstructured", "accumulate", "accumulate_sharded", "admm", "admm_prepare", "admm_update", "get_solver",
    "init_stats", "keep_mask", "layer_mask", "magnitude", "nm_mask", "num_pruned", "parse_pattern", "pattern_mask",
    "reconstruction_error", "sparsegpt", "sparsegpt_prepare", "unstructured_mask", "wanda",
]
