"""The pruning pass at LLaMA-2-7B and -70B shapes, on paper: ``jax.eval_shape`` of every jitted step of one block
(statistics with taps, each solver on each linear shape, the pruned forward), no memory allocated.

  python experiments/scale/shapes.py --out experiments/scale/result.json

Reports the bytes each step holds, and per-device bytes on a ``(data, model)`` mesh: calibration activations
split over ``data``, block weights and statistics replicated, solver rows split over ``model``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import machine, write_json  # noqa: E402
from jaxprune.models import _model as M  # noqa: E402
from jaxprune.models._config import from_hf_config  # noqa: E402
from jaxprune.prune import NM, Unstructured, init_stats  # noqa: E402
from jaxprune.prune import sequential as S  # noqa: E402

SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
}


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def one_block(name: str, nsamples: int, seqlen: int, batch: int, data: int, model: int) -> dict:
  config = from_hf_config({"model_type": "llama", "max_position_embeddings": 4096, **SHAPES[name]})
  params = M.abstract_params(config)
  block = params["layers"][0]
  h = jax.ShapeDtypeStruct((batch, seqlen, config.hidden_size), jnp.float32)
  ctx = jax.eval_shape(lambda: M.context(config, batch, seqlen))
  groups = S.block_linears(config, block)
  widths = {tap: S.kernel_at(block, paths[0]).shape[0] for tap, paths in groups.items()}
  stats = jax.eval_shape(lambda: {tap: init_stats(d) for tap, d in widths.items()})
  weights = jax.ShapeDtypeStruct((batch,), jnp.float32)
  new_stats = jax.eval_shape(lambda *a: S._stats_step(*a, config=config, modes=("full", "full"), mesh=None),
                             block, h, ctx, stats, weights)
  out = jax.eval_shape(lambda b, x, c: S._forward(b, x, c, config=config, modes=("full", "full")), block, h, ctx)
  solvers = {}
  for method, pattern in (("sparsegpt", Unstructured(0.5)), ("admm", NM(2, 4)), ("wanda", Unstructured(0.5))):
    spec = S.PruneSpec(method, pattern)
    for tap, paths in groups.items():
      for path in paths:
        k = S.kernel_at(block, path)
        w = jax.ShapeDtypeStruct(k.shape[::-1], jnp.float32)
        res = jax.eval_shape(S.jitted_solver(spec), w, new_stats[tap])
        solvers[f"{method} {path} {w.shape}"] = {"w": list(res.w.shape), "mask": list(res.mask.shape)}
  activations = nsamples * seqlen * config.hidden_size * 4
  per_device = {
      "calibration_activations_in_and_out": 2 * activations / data,
      "block_params": nbytes(block),
      "statistics": nbytes(new_stats),
      "largest_solver_weight_rows": max(S.kernel_at(block, p).size for ps in groups.values() for p in ps) * 4 / model,
  }
  return {
      "config": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                                                 "num_kv_heads")},
      "total_params": int(sum(x.size for x in jax.tree.leaves(params))),
      "calibration": {"nsamples": nsamples, "seqlen": seqlen, "batch": batch},
      "block_output_shape": list(out.shape),
      "statistics_shapes": {tap: list(s.gram.shape) for tap, s in new_stats.items()},
      "solver_shapes": solvers,
      "mesh": {"data": data, "model": model},
      "bytes_per_device": per_device,
      "gib_per_device_total": sum(per_device.values()) / 2**30,
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nsamples", type=int, default=128)
  p.add_argument("--seqlen", type=int, default=2048)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--out", type=Path, default=Path(__file__).with_name("result.json"))
  args = p.parse_args()
  result = {"command": "python experiments/scale/shapes.py " + " ".join(sys.argv[1:]), "machine": machine()}
  for name, (data, model) in (("llama-2-7b", (8, 1)), ("llama-2-70b", (8, 8))):
    result[name] = one_block(name, args.nsamples, args.seqlen, args.batch, data, model)
    print(name, json.dumps(result[name]["bytes_per_device"]), f"{result[name]['gib_per_device_total']:.2f} GiB")
  write_json(args.out, result)


if __name__ == "__main__":
  main()
