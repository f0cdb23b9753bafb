"""Where an accelerator's first calls spend their time: per linear shape of SmolLM2-135M, the first and a later call
of SparseGPT's inverse factor alone and of the whole SparseGPT solver (50 % unstructured), and the first and a
later eval batch of a 2-block SmolLM2-shaped random model. Run once per XLA_FLAGS setting, each in a process of its
own; ``--out`` (JSON) is rewritten after every measurement, so a run stopped by a time limit keeps what it measured:

  python experiments/accelerator/compile_probe.py --out probe_default.json
  XLA_FLAGS=--xla_gpu_autotune_level=0 python experiments/accelerator/compile_probe.py --out probe_autotune0.json
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import command, machine, write_json  # noqa: E402
from experiments.solver_speed.bench import timed  # noqa: E402
import jaxprune as jp  # noqa: E402
from jaxprune.models import _model as M  # noqa: E402
from jaxprune.prune.solvers._sparsegpt import _inverse_cholesky_upper  # noqa: E402

SMOLLM2 = dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=2, num_heads=9,
               num_kv_heads=3, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True, norm_eps=1e-5,
               rope_theta=100000.0)
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down


def first_and_later(fn, *args):
  """Seconds of the first call (compiling) and of one later call."""
  first, later = timed(fn, *args, repeats=1)
  return round(first, 3), round(later, 4)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--out", type=Path, required=True)
  args = p.parse_args()
  result = {"command": command(Path(__file__)), "machine": machine(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "device": jax.devices()[0].device_kind, "shapes": {}}
  rng = np.random.default_rng(0)
  for d_out, d_in in SHAPES:
    x = rng.standard_normal((2048, d_in)).astype(np.float32)
    gram = jnp.asarray(x.T @ x)
    stats = jp.Stats(gram=gram, sq_norms=jnp.diagonal(gram), count=jnp.float32(2048))
    w = jnp.asarray(rng.standard_normal((d_out, d_in)).astype(np.float32))
    inv = jax.jit(lambda h: _inverse_cholesky_upper(h, percdamp=0.01, max_retries=6, pad=0))
    entry = result["shapes"][f"{d_out}x{d_in}"] = {}
    entry["inverse_factor"] = first_and_later(inv, gram)
    entry["sparsegpt"] = first_and_later(lambda w: jp.sparsegpt(w, stats, pattern=jp.Unstructured(0.5)), w)
    print(d_out, d_in, entry, flush=True)
    write_json(args.out, result)
  config = jp.ModelConfig(**SMOLLM2)
  params = jax.jit(M.init_params, static_argnums=0)(config, jax.random.key(0))
  tokens = rng.integers(0, config.vocab_size, (16, 512)).astype(np.int32)
  timings = [jp.perplexity(params, tokens, config=config, batch_size=16, progress=False).seconds for _ in range(2)]
  result["eval_2_blocks_16x512"] = [round(t, 3) for t in timings]
  print(result["eval_2_blocks_16x512"], flush=True)
  write_json(args.out, result)


if __name__ == "__main__":
  main()
