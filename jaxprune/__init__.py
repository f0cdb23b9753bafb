"""jaxprune: post-training pruning of large language models in JAX.

The tree follows the data flow: text -> tokens (:mod:`jaxprune.data`) -> model forward with taps
(:mod:`jaxprune.models`, run by :mod:`jaxprune.runner`) -> statistics -> per-layer solver (:mod:`jaxprune.prune`)
-> pruned params -> Orbax checkpoint (:mod:`jaxprune.io`) -> perplexity. Depth pruning is :mod:`jaxprune.depth`.
"""
import os

# OpenBLAS, the LAPACK behind XLA's CPU Cholesky factorisations and triangular solves, keeps its worker threads
# spinning after each call; on a machine with few cores they take cores from the matrix products that follow
# (SparseGPT's and ADMM's solvers). A timeout of 2^4 cycles lets them sleep at once and changes no result.
# OpenBLAS reads it when it loads, at the first LAPACK call of the process; a value already set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from jaxprune._compile_cache import use_compilation_cache
from jaxprune._evaluate import EvalResult, perplexity
from jaxprune.data import TokenWindows, load_text, load_windows
from jaxprune.depth import DepthResult, depth_prune
from jaxprune.errors import JaxpruneError
from jaxprune.io import LoadedModel, load_checkpoint, load_model, save_checkpoint, save_hf_dir
from jaxprune.models import ModelConfig, from_hf_config, to_hf_config
from jaxprune.prune import (
    NM, SOLVERS, SolverResult, Stats, Unstructured, accumulate, accumulate_sharded, admm, admm_prepare, admm_update,
    get_solver, init_stats, magnitude, sparsegpt, sparsegpt_prepare, wanda)
from jaxprune.prune._job import PruneOutcome, prune
from jaxprune.prune._sequential import PruneSpec, run_pass
from jaxprune.runner import Runner, data_mesh, make_mesh
from jaxprune.retrain import RetrainResult, TrainSpec, apply, lora_init, merge, parse_train_spec, retrain

__all__ = [
    # High level: models, text, pruning, evaluation, checkpoints.
    "load_model", "LoadedModel", "ModelConfig", "load_windows", "load_text", "TokenWindows",
    "prune", "PruneSpec", "PruneOutcome", "depth_prune", "DepthResult", "perplexity", "EvalResult",
    "load_checkpoint", "save_checkpoint", "save_hf_dir", "from_hf_config", "to_hf_config", "JaxpruneError",
    # Devices, forward passes, compilation.
    "Runner", "make_mesh", "data_mesh", "use_compilation_cache",
    # Solver level: pure functions over (d_out, d_in) weights and input statistics.
    "magnitude", "wanda", "sparsegpt", "sparsegpt_prepare", "admm", "admm_prepare", "admm_update", "SolverResult",
    "SOLVERS", "get_solver", "Stats", "init_stats", "accumulate", "accumulate_sharded", "NM", "Unstructured",
    "run_pass",
    # Retraining after pruning (PERP, masked fine-tuning); jaxprune.retrain is the function, the package's other
    # names are imported from jaxprune.retrain.
    "retrain", "RetrainResult", "TrainSpec", "parse_train_spec", "lora_init", "apply", "merge",
]

# The installed version, and saving what prune() returns as a checkpoint.
from importlib.metadata import PackageNotFoundError as _NotInstalled, version as _installed_version  # noqa: E402

from jaxprune.prune._job import save_outcome  # noqa: E402

try:
  __version__ = _installed_version("jaxprune")
except _NotInstalled:
  __version__ = "0+unknown"
__all__ += ["save_outcome"]

# LLM Surgeon: Kronecker-factored curvature, one global allocation over all layers, multi-shot.
from jaxprune.prune._surgeon_pass import RowsColumns, SurgeonSpec, surgeon_prune  # noqa: E402

__all__ += ["surgeon_prune", "SurgeonSpec", "RowsColumns"]
