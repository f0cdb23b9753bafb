"""The pruned weights' return to the kernel layout at LLaMA-2-7B's linear shapes, in bfloat16: the pass's program
(cast to bfloat16 and count the zeros in the solver's ``(d_out, d_in)`` layout, then transpose) against the same
work with the transpose first, as one jitted program (how the pass did it from f47e51d to 159950d), best of 3
after a compiling call.

    python experiments/scale/kernel_layout.py     # -> kernel_layout.json (about a minute)
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import command, machine, write_json  # noqa: E402

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}  # (d_out, d_in)


def best(fn, repeats: int = 3) -> float:
  import jax

  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  import jax
  import jax.numpy as jnp

  from jaxprune.models._convert import from_hf_layout
  from jaxprune.prune._sequential import _kernel_layout

  @functools.partial(jax.jit, static_argnames=("dtype",))
  def transpose_first(w, mask, *, dtype):
    kernel = from_hf_layout(w).astype(dtype)
    return kernel, from_hf_layout(mask), jnp.sum(kernel == 0)

  rng = np.random.default_rng(0)
  result = {"command": command(Path(__file__)), "machine": machine(), "seconds": {}}
  for name, (d_out, d_in) in SHAPES.items():
    w = jnp.asarray(rng.standard_normal((d_out, d_in), np.float32))
    mask = w > 0
    result["seconds"][name] = {
        "shape": [d_out, d_in],
        "cast_then_transpose": best(lambda: _kernel_layout(w, mask, dtype=jnp.bfloat16)),
        "transpose_first": best(lambda: transpose_first(w, mask, dtype=jnp.bfloat16))}
  per_block = {kind: sum(result["seconds"][name][kind] * n for name, n in (("q/k/v/o", 4), ("gate/up", 2), ("down", 1)))
               for kind in ("cast_then_transpose", "transpose_first")}
  result["seconds_per_block"] = per_block
  write_json(Path(__file__).with_name("kernel_layout.json"), result)
  print(result)


if __name__ == "__main__":
  main()
