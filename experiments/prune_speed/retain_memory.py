"""A pass with and without the host memory it frees kept for its next requests (``jaxprune/_memory.py``).

  python experiments/prune_speed/retain_memory.py     # -> retain_memory.json beside this script (about 5 min)

SmolLM2-135M-Instruct, its first ``--blocks`` blocks (default 12), the parity calibration tokens (64 × 512, batches
of 8), Wanda 50 % in each order; each run in a fresh process (compilation included), with
``JAXPRUNE_RETAIN_MEMORY=1`` (memory kept, the default of a pass on a model in memory) and ``=0`` (``malloc`` left
alone) in turn, ``--repeats`` times: the pass's seconds, its peak resident memory and its minor page faults.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import REFERENCE, command, machine, parse_case, peak_rss_gb, write_json  # noqa: E402

ORDERS = ("default", "true_sequential")


def worker(order: str, blocks: int) -> dict:
  import numpy as np

  import jaxprune as jp

  model = jp.load_model("smollm2-135m")
  params = {**model.params, "layers": model.params["layers"][:blocks]}
  calib = np.load(REFERENCE / "calib_512x64.npy")
  spec = jp.PruneSpec("wanda", parse_case("wanda:u50")[1], true_sequential=order == "true_sequential")
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  out = jp.prune(params, calib, config=model.config.replace(num_layers=blocks), spec=spec, batch_size=8,
                 progress=False)
  return {"seconds": out.seconds, "peak_rss_gb": peak_rss_gb(),
          "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--blocks", type=int, default=12)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.blocks)))
    return
  runs = {order: {"kept": [], "not_kept": []} for order in ORDERS}
  for order in ORDERS:
    for _ in range(args.repeats):
      for name, value in (("not_kept", "0"), ("kept", "1")):
        proc = subprocess.run([sys.executable, __file__, "--worker", order, "--blocks", str(args.blocks)],
                              env={**os.environ, "JAXPRUNE_RETAIN_MEMORY": value}, capture_output=True, text=True,
                              check=True)
        runs[order][name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(order, name, runs[order][name][-1], flush=True)
  write_json(Path(__file__).with_name("retain_memory.json"),
             {"command": command(Path(__file__)), "machine": machine(), "blocks": args.blocks, "runs": runs})


if __name__ == "__main__":
  main()
