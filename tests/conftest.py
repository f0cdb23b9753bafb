"""Strict test setup: 8 simulated CPU devices, strict dtype and rank promotion, quick compilation.

The device count must be set before any JAX backend starts, hence at import of this file.
"""
import os

# The suite's time is mostly XLA compiling small programs: LLVM's optimisation level 0 compiles them about a third
# faster. It changes how fast the generated code runs, not what it computes (no fast-math at any level).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["JAXPRUNE_COMPILATION_CACHE"] = "0"  # commands run in the test processes leave ~/.cache alone

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
