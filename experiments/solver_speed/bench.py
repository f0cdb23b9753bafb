"""Per-solver seconds on LLaMA-7B-shaped matrices, against a plain ``jnp.matmul`` on the same machine, same run.

  python experiments/solver_speed/bench.py --out experiments/solver_speed/result_cpu.json

Shapes ``(d_out, d_in)``: 4096×4096 (q/k/v/o) and 11008×4096 (gate/up). The Gram comes from random correlated
inputs. Each solver is compiled first (compile seconds reported apart), then timed over ``--repeats`` runs.
``gflops`` is the solver's dominant arithmetic (dense linear algebra, counted below) over its wall time;
compare it with the matmul's to see whether a solver is matmul-bound or loop-bound.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import machine, write_json  # noqa: E402
from jaxprune.prune import NM, Stats, Unstructured, admm, magnitude, sparsegpt, wanda  # noqa: E402


def flops(method: str, d_out: int, d_in: int, iterations: int = 20) -> float:
  """Dominant flops: SparseGPT = Cholesky and inverse (~2 d_in³) + OBS updates (d_out d_in²);
  ADMM = factorisation (~d_in³) + (iterations + 1) products of (d_in × d_in) by (d_in × d_out)."""
  if method == "sparsegpt":
    return 2.0 * d_in**3 + 1.0 * d_out * d_in**2
  if method == "admm":
    return 1.0 * d_in**3 + (iterations + 1) * 2.0 * d_in**2 * d_out
  return 0.0


def timed(fn, *args, repeats: int):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_and_first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return compile_and_first, min(times)


def problem(d_out: int, d_in: int, tokens: int, key):
  k1, k2, k3 = jax.random.split(key, 3)
  mix = jax.random.normal(k1, (d_in, d_in), jnp.float32) / np.sqrt(d_in)
  x = jax.random.normal(k2, (tokens, d_in), jnp.float32) @ (jnp.eye(d_in) + 0.5 * mix)
  gram = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
  stats = Stats(gram=gram, sq_norms=jnp.diagonal(gram), count=jnp.float32(tokens))
  return jax.random.normal(k3, (d_out, d_in), jnp.float32) / np.sqrt(d_in), stats


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default="4096x4096,11008x4096")
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--out", type=Path, default=Path(__file__).with_name("result_cpu.json"))
  args = p.parse_args()
  a = jnp.ones((4096, 4096), jnp.float32)
  mm = jax.jit(lambda x: jnp.matmul(x, x))
  _, mm_seconds = timed(mm, a, repeats=3)
  result = {"command": "python experiments/solver_speed/bench.py " + " ".join(sys.argv[1:]), "machine": machine(),
            "device": str(jax.devices()[0]), "backend": jax.default_backend(),
            "matmul_4096_gflops": 2 * 4096**3 / mm_seconds / 1e9, "solvers": {}}
  print(f"matmul 4096^3: {result['matmul_4096_gflops']:.1f} GFLOP/s", flush=True)
  solvers = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt, "admm": admm}
  for shape in args.shapes.split(","):
    d_out, d_in = map(int, shape.split("x"))
    w, stats = problem(d_out, d_in, args.tokens, jax.random.key(0))
    for name, solve in solvers.items():
      for pattern in (Unstructured(0.5), NM(2, 4)):
        fn = jax.jit(functools.partial(solve, pattern=pattern))
        first, best = timed(fn, w, stats, repeats=args.repeats)
        key = f"{name} {shape} {'2:4' if isinstance(pattern, NM) else 'u50'}"
        f = flops(name, d_out, d_in)
        result["solvers"][key] = {"seconds": best, "compile_and_first_seconds": first,
                                  "gflops": f / best / 1e9 if f else None,
                                  "fraction_of_matmul": (f / best / 1e9) / result["matmul_4096_gflops"] if f else None}
        print(key, result["solvers"][key], flush=True)
  write_json(args.out, result)


if __name__ == "__main__":
  main()
