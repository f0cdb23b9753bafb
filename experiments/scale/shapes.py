"""The pruning pass at LLaMA-2-7B and -70B shapes, on paper: ``jax.eval_shape`` of every step of one block (the
runner's tapped forward and the statistics, each solver on each linear shape, the pruned forward), no memory
allocated.

  python experiments/scale/shapes.py                  # -> result.json, table.md
  python experiments/scale/shapes.py --only-report    # table.md from result.json

Reports the bytes each step holds, and per-device bytes on a ``(data, model)`` mesh: calibration activations
split over ``data``, block weights and statistics replicated, solver rows split over ``model``.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import command, machine, write_json  # noqa: E402
from jaxprune import NM, Unstructured, accumulate, get_solver, init_stats  # noqa: E402
from jaxprune.models import abstract_params, from_hf_config, linear_groups  # noqa: E402
from jaxprune.runner import Runner  # noqa: E402

SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
}


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def kernel_shape(block: dict, path: str) -> tuple[int, int]:
  """``(d_in, d_out)`` of the linear at ``path`` (e.g. ``"mlp/down_proj"``) of a block's parameters."""
  node = block
  for key in path.split("/"):
    node = node[key]
  return tuple(node["kernel"].shape)


def one_block(name: str, nsamples: int, seqlen: int, batch: int, data: int, model: int) -> dict:
  config = from_hf_config({"model_type": "llama", "max_position_embeddings": 4096, **SHAPES[name]})
  params = abstract_params(config)
  block = params["layers"][0]
  runner = Runner(config, batch_size=batch, windowed=False)
  h = jax.ShapeDtypeStruct((batch, seqlen, config.hidden_size), jnp.float32)
  groups = linear_groups(config)
  widths = {tap: kernel_shape(block, paths[0])[0] for tap, paths in groups.items()}

  def statistics(block, h):
    taps = runner.taps(block, h, names=tuple(groups))
    return {tap: accumulate(init_stats(d), taps[tap]) for tap, d in widths.items()}

  new_stats = jax.eval_shape(statistics, block, h)
  out = jax.eval_shape(lambda b, x: runner.block(b, x), block, h)
  solvers = {}
  for method, pattern in (("sparsegpt", Unstructured(0.5)), ("admm", NM(2, 4)), ("wanda", Unstructured(0.5))):
    solve = functools.partial(get_solver(method).solve, pattern=pattern)
    for tap, paths in groups.items():
      for path in paths:
        w = jax.ShapeDtypeStruct(kernel_shape(block, path)[::-1], jnp.float32)
        res = jax.eval_shape(solve, w, new_stats[tap])
        solvers[f"{method} {path} {w.shape}"] = {"w": list(res.w.shape), "mask": list(res.mask.shape)}
  activations = nsamples * seqlen * config.hidden_size * 4
  per_device = {
      "calibration_activations_in_and_out": 2 * activations / data,
      "block_params": nbytes(block),
      "statistics": nbytes(new_stats),
      "largest_solver_weight_rows": max(math.prod(kernel_shape(block, p)) for ps in groups.values() for p in ps)
                                    * 4 / model,
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


def table(result: dict) -> str:
  """Markdown table: bytes per device of each part, for both models."""
  names = ("llama-2-7b", "llama-2-70b")
  parts = {"calibration_activations_in_and_out": "calibration activations in + out (split over `data`)",
           "block_params": "one block's weights (replicated)",
           "statistics": "statistics: Gram of each input group (replicated)",
           "largest_solver_weight_rows": "largest solver weight, rows split over `model`"}
  mesh = {n: result[n]["mesh"] for n in names}
  rows = ["| per device | " + " | ".join(f"{n}, mesh data={mesh[n]['data']} × model={mesh[n]['model']}"
                                         for n in names) + " |", "|---|---|---|"]
  for key, label in parts.items():
    rows.append(f"| {label} | " + " | ".join(f"{result[n]['bytes_per_device'][key] / 2**30:.2f} GiB"
                                           for n in names) + " |")
  rows.append("| total | " + " | ".join(f"{result[n]['gib_per_device_total']:.2f} GiB" for n in names) + " |")
  return "\n".join(rows) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nsamples", type=int, default=128)
  p.add_argument("--seqlen", type=int, default=2048)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for result.json and table.md")
  p.add_argument("--only-report", action="store_true", help="rewrite table.md from result.json")
  args = p.parse_args()
  if args.only_report:
    (args.out / "table.md").write_text(table(json.loads((args.out / "result.json").read_text())))
    return
  result = {"command": command(Path(__file__)), "machine": machine()}
  for name, (data, model) in (("llama-2-7b", (8, 1)), ("llama-2-70b", (8, 8))):
    result[name] = one_block(name, args.nsamples, args.seqlen, args.batch, data, model)
    print(name, json.dumps(result[name]["bytes_per_device"]), f"{result[name]['gib_per_device_total']:.2f} GiB")
  write_json(args.out / "result.json", result)
  (args.out / "table.md").write_text(table(result))
  print(table(result))


if __name__ == "__main__":
  main()
