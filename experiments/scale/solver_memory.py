"""The memory of SparseGPT's solver on LLaMA-2-7B's largest input (``down_proj``: 4096 × 11008 weights, a Gram over
11008 inputs), as the streamed pass runs it: its two jitted programs compiled for that shape, the factorisation of
the Gram (the solver's ``prepare`` step, once per input group) and the solver given that factor, with their buffers
from XLA's ``memory_analysis`` (arguments, temporaries, outputs) and seconds, and the process's peak resident memory
before and after them, on a Gram of 256 random calibration tokens; beside them, the buffers of the solver that
factorises inside (``whole``: compiled, not run).

    python experiments/scale/solver_memory.py            # -> solver_memory.json (about a minute)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import command, machine, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent


def peak_gb() -> float:
  """The process's peak resident memory so far (``VmHWM``), GB."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM"):
      return int(line.split()[1]) * 1024 / 1e9
  raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
  import jax
  import jax.numpy as jnp

  from jaxprune.prune._patterns import Unstructured
  from jaxprune.prune._sequential import PruneSpec, jitted_prepare, jitted_solver
  from jaxprune.prune._stats import Stats

  d_out, d_in, tokens = 4096, 11008, 256
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((tokens, d_in), np.float32))
  gram = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
  del x
  stats = Stats(gram, jnp.diag(gram), jnp.float32(tokens))
  w = jnp.asarray(0.02 * rng.standard_normal((d_out, d_in), np.float32))
  jax.block_until_ready((stats, w))
  before = peak_gb()
  spec = PruneSpec("sparsegpt", Unstructured(0.5))

  def buffers(compiled) -> dict:
    analysis = compiled.memory_analysis()
    return {"arguments": analysis.argument_size_in_bytes / 1e9, "temporaries": analysis.temp_size_in_bytes / 1e9,
            "outputs": analysis.output_size_in_bytes / 1e9}

  def run(call):
    start = time.perf_counter()
    out = jax.block_until_ready(call())
    return out, time.perf_counter() - start

  prepare = jitted_prepare(spec).lower(stats).compile()
  factor, prepare_seconds = run(lambda: prepare(stats))
  solve = jitted_solver(spec).lower(w, stats, prepared=factor).compile()
  _, solve_seconds = run(lambda: solve(w, stats, prepared=factor))
  whole = jitted_solver(spec).lower(w, stats).compile()
  result = {"command": command(Path(__file__)), "machine": machine(), "shape": [d_out, d_in], "tokens": tokens,
            "prepare": {"xla_gb": buffers(prepare), "seconds": prepare_seconds},
            "solve": {"xla_gb": buffers(solve), "seconds": solve_seconds},
            "whole": {"xla_gb": buffers(whole)},
            "gram_gb": d_in * d_in * 4 / 1e9, "peak_rss_gb_before": before, "peak_rss_gb_after": peak_gb()}
  write_json(HERE / "solver_memory.json", result)
  print(result)


if __name__ == "__main__":
  main()
