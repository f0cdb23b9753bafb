"""jaxprune: post-training pruning of large language models in JAX.

The tree follows the data flow: text -> tokens (:mod:`jaxprune.data`) -> model forward with taps
(:mod:`jaxprune.models`) -> statistics -> per-layer solver (:mod:`jaxprune.prune`) -> pruned params -> Orbax
checkpoint (:mod:`jaxprune.io`) -> perplexity (:mod:`jaxprune.evaluate`).
"""
from jaxprune.data import TokenWindows, load_text, load_windows
from jaxprune.errors import JaxpruneError
from jaxprune.evaluate import EvalResult, data_mesh, perplexity
from jaxprune.io.checkpoint import load_checkpoint, save_checkpoint
from jaxprune.io.hf import save_hf_dir
from jaxprune.io.load import LoadedModel, load_model
from jaxprune.models.config import ModelConfig, from_hf_config, to_hf_config
from jaxprune.prune import (
    NM, SOLVERS, SolverResult, Stats, Unstructured, accumulate, accumulate_sharded, admm, admm_update, get_solver,
    init_stats, magnitude, sparsegpt, wanda)
from jaxprune.prune.job import PruneOutcome, prune
from jaxprune.prune.sequential import PruneSpec, run_pass

__all__ = [
    "EvalResult", "JaxpruneError", "LoadedModel", "ModelConfig", "NM", "PruneOutcome", "PruneSpec", "SOLVERS",
    "SolverResult", "Stats", "TokenWindows", "Unstructured", "accumulate", "accumulate_sharded", "admm",
    "admm_update", "data_mesh", "from_hf_config", "get_solver", "init_stats", "load_checkpoint", "load_model",
    "load_text", "load_windows", "magnitude", "perplexity", "prune", "run_pass", "save_checkpoint", "save_hf_dir",
    "sparsegpt", "to_hf_config", "wanda",
]
