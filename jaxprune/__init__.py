"""jaxprune: post-training pruning of large language models in JAX.

The tree follows the data flow: text -> tokens (:mod:`jaxprune.data`) -> model forward with taps
(:mod:`jaxprune.models`) -> statistics -> per-layer solver (:mod:`jaxprune.prune`) -> pruned params -> Orbax
checkpoint (:mod:`jaxprune.io`) -> perplexity (:mod:`jaxprune._evaluate`).
"""
import os

# OpenBLAS, the LAPACK behind XLA's CPU Cholesky factorisations and triangular solves, keeps its worker threads
# spinning for about 2^28 cycles after each call; on a machine with few cores they take cores from the matrix
# products that follow (SparseGPT's and ADMM's solvers: 12–22 % of ADMM's solver time on SmolLM2 on 2 cores). A
# timeout of 2^4 cycles lets them sleep at once and changes no result. OpenBLAS reads it when it loads, at the
# first LAPACK call of the process; a value already set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from jaxprune.data import TokenWindows, load_text, load_windows
from jaxprune.errors import JaxpruneError
from jaxprune._evaluate import EvalResult, data_mesh, perplexity
from jaxprune.io._checkpoint import load_checkpoint, save_checkpoint
from jaxprune.io._hf import save_hf_dir
from jaxprune.io._load import LoadedModel, load_model
from jaxprune.models._config import ModelConfig, from_hf_config, to_hf_config
from jaxprune.prune import (
    NM, SOLVERS, SolverResult, Stats, Unstructured, accumulate, accumulate_sharded, admm, admm_update, get_solver,
    init_stats, magnitude, sparsegpt, wanda)
from jaxprune.prune._job import PruneOutcome, prune
from jaxprune.prune._sequential import PruneSpec, run_pass

__all__ = [
    "EvalResult", "JaxpruneError", "LoadedModel", "ModelConfig", "NM", "PruneOutcome", "PruneSpec", "SOLVERS",
    "SolverResult", "Stats", "TokenWindows", "Unstructured", "accumulate", "accumulate_sharded", "admm",
    "admm_update", "data_mesh", "from_hf_config", "get_solver", "init_stats", "load_checkpoint", "load_model",
    "load_text", "load_windows", "magnitude", "perplexity", "prune", "run_pass", "save_checkpoint", "save_hf_dir",
    "sparsegpt", "to_hf_config", "wanda",
]
