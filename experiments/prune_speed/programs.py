"""Each forward program of a Wanda pass against its FLOP time, in the default order and true-sequential: where
the roofline's excess (``roofline.py``) sits, compilation left out.

  python experiments/prune_speed/programs.py [--blocks N]     # -> programs.json beside this script

One process: SmolLM2-135M-Instruct and the parity calibration tokens (64 × 512, batches of 8), Wanda 50 % over
blocks ``0..N-1`` (default 4) in each order, after the same pass over block 0 (which compiles every program).
Each call of the runner's ``taps`` and ``block`` and of the statistics step is timed by a wrapper that waits for
its result, and keyed by what it computes: the taps it returns and the inputs ``given`` to it (true-sequential
computes each group's inputs from those kept of the groups before). A program's FLOPs are its matrix products
(:func:`roofline.linear_shapes`, :func:`roofline.attention_flops`); ``ratio`` = seconds / (FLOPs / the 2048³
float32 matmul rate, the mean of its measurements before and after the passes). ``rest_seconds_per_block``: the
rest of the pass (the embedding of the calibration windows, once per pass and here spread over ``N`` blocks; the
solvers; the reports; the copies of each block's outputs to the host).
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import REFERENCE, command, machine, write_json  # noqa: E402
from experiments.prune_speed.roofline import (GEMM, GEMM_KEY, _attention_chunk, _timed_steps,  # noqa: E402
                                              attention_flops, linear_shapes, matmul_rates)

# What each program computes, by the taps it returns and the inputs given to it (a LLaMA block).
PRODUCTS = {"taps:attn_in,o_in,mlp_in,down_in": ("attn_in", "attention", "o_in", "mlp_in"),
            "block": ("attn_in", "attention", "o_in", "mlp_in", "down_in"),
            "taps:attn_in": (),
            "taps:o_in": ("attn_in", "attention"),
            "taps:mlp_in,mid:given=o_in": ("o_in",),
            "taps:down_in:given=mid,mlp_in,o_in": ("mlp_in",),
            "block:given=down_in,mid,mlp_in,o_in": ("down_in",)}


def program_flops(config, seq: int, windows: int) -> dict[str, float]:
  """FLOPs of each program of :data:`PRODUCTS` over ``windows`` windows of ``seq`` tokens."""
  per_token = {tap: sum(2 * o * i for o, i in shapes) for tap, shapes in linear_shapes(config).items()}
  attention = attention_flops(config, seq, chunk=_attention_chunk()) / seq
  return {key: windows * seq * sum(attention if p == "attention" else per_token[p] for p in parts)
          for key, parts in PRODUCTS.items()}


def program_key(step: str, kwargs: dict) -> str:
  """The key of :data:`PRODUCTS` of a call of the runner's ``taps``, ``tap_sums`` or ``block`` (the taps it
  returns or sums and the inputs given to it); the pass's other steps by their names."""
  if step not in ("taps", "outputs"):
    return step
  names, given = tuple(dict.fromkeys((*kwargs.get("names", ()), *kwargs.get("keep", ())))), kwargs.get("given")
  kind = "taps" if step == "taps" else "block"
  return kind + (":" + ",".join(names) if names else "") + (":given=" + ",".join(sorted(given)) if given else "")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--blocks", type=int, default=4)
  args = parser.parse_args()
  import numpy as np

  import jaxprune as jp

  model = jp.load_model("smollm2-135m")
  calib = np.load(REFERENCE / "calib_512x64.npy")
  windows, seq = calib.shape
  flops = program_flops(model.config, seq, windows)
  rates = [matmul_rates([GEMM])[GEMM_KEY]]
  runs = {}
  for order in ("default", "true_sequential"):
    spec = jp.PruneSpec("wanda", jp.Unstructured(0.5), true_sequential=order == "true_sequential")
    seconds = collections.Counter()
    jp.prune(model.params, calib, config=model.config, spec=spec, batch_size=8, progress=False, blocks=(0, 1))
    undo = _timed_steps(seconds, key=program_key)
    try:
      start = time.perf_counter()
      jp.prune(model.params, calib, config=model.config, spec=spec, batch_size=8, progress=False,
               blocks=(0, args.blocks))
      total = time.perf_counter() - start
    finally:
      undo()
    runs[order] = {"pass_seconds_per_block": total / args.blocks,
                   "programs": {k: {"seconds_per_block": v / args.blocks, "gflop_per_block": flops.get(k, 0) / 1e9}
                                for k, v in seconds.items() if k in PRODUCTS or k == "statistics"}}
  rates.append(matmul_rates([GEMM])[GEMM_KEY])
  rate = sum(rates) / 2 * 1e9
  for run in runs.values():
    for program in run["programs"].values():
      ideal = program["gflop_per_block"] * 1e9 / rate
      program["ideal_seconds_per_block"] = ideal
      program["ratio"] = program["seconds_per_block"] / ideal if ideal else None
    timed = sum(p["seconds_per_block"] for p in run["programs"].values())
    run["rest_seconds_per_block"] = run["pass_seconds_per_block"] - timed
  result = {"command": command(Path(__file__)), "machine": machine(), "blocks": args.blocks,
            "tokens": [windows, seq], "matmul_gflop_per_s_before_after": rates, "runs": runs}
  write_json(Path(__file__).with_name("programs.json"), result)
  for order, run in runs.items():
    print(f"{order}: {run['pass_seconds_per_block']:.3f} s per block, rest {run['rest_seconds_per_block']:.3f} s")
    for k, p in sorted(run["programs"].items(), key=lambda kv: -kv[1]["seconds_per_block"]):
      ratio = f"{p['ratio']:.2f}" if p["ratio"] else "-"
      print(f"  {k:45s} {p['seconds_per_block']:.3f} s (ideal {p['ideal_seconds_per_block']:.3f} s, {ratio}×)")


if __name__ == "__main__":
  main()
