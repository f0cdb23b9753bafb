"""Can one block's forward get closer to its FLOP time on this CPU through XLA's own options or the attention's
query chunk? Each setting runs in a fresh process (XLA reads its flags once):

  python experiments/prune_speed/forward_knobs.py       # -> forward_knobs.json beside this script

Per setting: block 1 of SmolLM2-135M-Instruct on one batch (8 random windows × 512 positions, float32, run window by
window as the pass does), best and median of 7 after a compiling run, beside the float32 ``HIGHEST`` 2048³ matmul
rate measured in the same process; ``ratio`` = best seconds / (the block's FLOPs at that rate), FLOPs counted as
``roofline.py`` counts them for the default chunk (linears, and the attention's products query chunk by chunk).
``checksum`` is the sum of the outputs, to see that a setting computes the same function.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import command, machine, write_json  # noqa: E402

FLAGS = ("", "--xla_cpu_use_xnnpack=true", "--xla_cpu_use_onednn=true",
         "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise", "--xla_cpu_experimental_ynn_fusion_type=dot",
         "--xla_cpu_prefer_vector_width=512", "--xla_cpu_enable_concurrency_optimized_scheduler=true")
CHUNKS = (64, 128, 256, 512)
DEFAULT_CHUNK = 128


def measure(chunk: int, repeats: int = 7) -> dict:
  """One setting, in this process: the block's seconds, the 2048³ rate, the FLOPs and the ratio."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  import jaxprune as jp
  from jaxprune.models import _layers, _llama
  from jaxprune.runner import Runner
  from experiments.prune_speed.pieces import best, timings
  from experiments.prune_speed.roofline import attention_flops, linear_shapes

  _llama.dot_attention = functools.partial(_layers.dot_attention, chunk=chunk)
  model = jp.load_model("smollm2-135m")
  config = model.config
  runner = Runner(config, batch_size=8)
  block = runner.place(model.params["layers"][1])
  h = jnp.asarray(np.random.default_rng(0).standard_normal((8, 512, config.hidden_size), np.float32) * 0.1)

  out = jax.block_until_ready(runner.block(block, h))
  times = timings(lambda: jax.block_until_ready(runner.block(block, h)), repeats)
  a = jnp.asarray(np.random.default_rng(1).standard_normal((2048, 2048), np.float32))
  product = jax.jit(functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST))
  rate = 2 * 2048**3 / best(lambda: product(a, a).block_until_ready(), 5)
  linears = 8 * 512 * sum(2 * o * i for shapes in linear_shapes(config).values() for o, i in shapes)
  flops = linears + 8 * attention_flops(config, 512, chunk=chunk)
  return {"seconds": min(times), "median_seconds": float(np.median(times)), "gflop": flops / 1e9,
          "matmul_gflop_per_s": rate / 1e9, "ratio": min(times) / (flops / rate), "checksum": float(jnp.sum(out))}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", type=Path, default=Path(__file__).with_name("forward_knobs.json"))
  p.add_argument("--one", type=int, metavar="CHUNK", help=argparse.SUPPRESS)  # a child process (flags: XLA_FLAGS)
  args = p.parse_args()
  if args.one:
    print(json.dumps(measure(args.one)))
    return
  settings = [(flags, DEFAULT_CHUNK) for flags in FLAGS] + [("", c) for c in CHUNKS if c != DEFAULT_CHUNK]
  runs = []
  for flags, chunk in settings:
    env = {**os.environ, "XLA_FLAGS": flags} if flags else {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, __file__, "--one", str(chunk)], env=env, capture_output=True,
                          text=True, check=True)
    runs.append({"xla_flags": flags, "chunk": chunk, **json.loads(done.stdout.strip().splitlines()[-1])})
    print(json.dumps(runs[-1]), flush=True)
  write_json(args.out, {"command": command(Path(__file__)), "machine": machine(), "load_end": os.getloadavg(),
                        "runs": runs})


if __name__ == "__main__":
  main()
