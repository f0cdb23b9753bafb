"""Where the seconds of one pruning pass go: timers around each jitted step of the sequential pass.

  python experiments/parity/breakdown.py --cases wanda:u50:ts sparsegpt:u50 --out experiments/parity/breakdown.json

Each case (``METHOD:uNN`` or ``METHOD:N:M``, ``:ts`` for ``--true-sequential``) runs in a fresh process on the
reference calibration tokens. Every step of ``jaxprune.prune._sequential`` that the pass calls (capturing the
inputs of the linears and accumulating their statistics, pruning a group of linears, recomputing block
outputs) is wrapped in a timer that waits for its result, so the parts add up to the pass; compilation seconds
come from JAX's own monitoring events and are included in the steps that triggered them.
"""
from __future__ import annotations

import argparse
import collections
import functools
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import REFERENCE, add_worker_args, parse_case, run_cases  # noqa: E402

STEPS = ("_stats_step", "_tap_step", "_forward", "_prune_group")


def worker(args) -> None:
  import jax
  import numpy as np

  compile_seconds = collections.Counter()
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **_: compile_seconds.update({event: duration}) if "compile" in event else None)
  from jaxprune.io._load import load_model
  from jaxprune.prune._job import prune

  sequential = importlib.import_module("jaxprune.prune._sequential")
  seconds, calls = collections.Counter(), collections.Counter()

  def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
      start = time.perf_counter()
      out = jax.block_until_ready(fn(*a, **k))
      seconds[name] += time.perf_counter() - start
      calls[name] += 1
      return out
    return wrapper

  for name in STEPS:
    setattr(sequential, name, timed(name, getattr(sequential, name)))
  method, pattern = parse_case(args.case.removesuffix(":ts"))
  model = load_model("smollm2-135m")
  calib = np.load(args.reference / "calib_512x64.npy")
  spec = sequential.PruneSpec(method, pattern, true_sequential=args.case.endswith(":ts"))
  outcome = prune(model.params, model.config, spec, calib, progress=False)
  print(json.dumps({"case": args.case, "prune_seconds": outcome.seconds,
                    "steps": {name: {"seconds": seconds[name], "calls": calls[name]} for name in STEPS if calls[name]},
                    "other_seconds": outcome.seconds - sum(seconds.values()),
                    "compile_seconds": dict(compile_seconds)}))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--reference", type=Path, default=REFERENCE)
  p.add_argument("--cases", nargs="*", default=["wanda:u50:ts", "sparsegpt:u50"])
  p.add_argument("--out", type=Path, default=Path(__file__).with_name("breakdown.json"))
  add_worker_args(p)
  args = p.parse_args()
  if args.worker:
    return worker(args)
  run_cases(Path(__file__), args.cases, args.out, "--reference", str(args.reference))


if __name__ == "__main__":
  main()
