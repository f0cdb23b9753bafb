"""Depth pruning: importance of blocks and of attention/MLP sublayers, their removal, and recovery.

Siddiqui et al. 2024, "A deeper look at depth pruning of LLMs"; ShortGPT (Men et al. 2024). Scores are
*higher = more important*; a unit is a whole block, an attention sublayer or an MLP sublayer
(see :mod:`jaxprune.depth._stages`). Removed blocks leave the model; removed sublayers become ``skip``, ``bias``
or ``lowrank`` modes of ``ModelConfig.sublayers`` with their adapters in the params, fitted in closed form or
trained (:mod:`jaxprune.depth._learned`).
"""
from jaxprune.depth._export import hf_compatible
from jaxprune.depth._metrics import (
    METRICS, Scores, Similarity, coalitions, leave_one_out, near_count, score, shapley, shapley_near, similarities)
from jaxprune.depth._pipeline import DepthResult, depth_prune, fit_adapters, removal_count
from jaxprune.depth._recovery import (
    FITS, INITS, Moments, Recovery, apply_adapter, fit, fit_bias, fit_lowrank, moments, parse_recovery, residual)
from jaxprune.depth._removal import param_count, remove_blocks, replace_units
from jaxprune.depth._stages import UNITS, candidates

__all__ = [
    "FITS", "INITS", "METRICS", "UNITS", "DepthResult", "Moments", "Recovery", "Scores", "Similarity",
    "apply_adapter", "candidates", "coalitions", "depth_prune", "fit", "fit_adapters", "fit_bias", "fit_lowrank",
    "hf_compatible", "leave_one_out", "moments", "near_count", "param_count", "parse_recovery", "remove_blocks",
    "removal_count", "replace_units", "residual", "score", "shapley", "shapley_near", "similarities",
]
