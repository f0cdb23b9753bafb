"""ADMM's mask schedules and scopes on the reference calibration tokens, evaluated in and out of the calibration domain.

  python experiments/parity/admm_schedules.py --cases 50:cubic:row 50:cubic:layer 50:final:layer 70:cubic:row \
      70:cubic:layer 70:final:layer --out experiments/parity/admm_schedules.json

A case is ``SPARSITY%:SCHEDULE:SCOPE``. The reference ADMM code's default selects the mask over the whole matrix
(``layer``) at the final sparsity in every mask iteration (``final``); the paper's ADMM-Grad raises the sparsity
along a cubic schedule (``cubic``); the reference's ``per_out`` path, jaxprune's default, ranks within each output
row (``row``) on the cubic schedule. All run on ``calib_512x64.npy`` (Wikipedia text), each case in a fresh
process; each pruned model is evaluated on

* ``austen``: the reference evaluation tokens ``eval_512x128.npy`` (all 128 windows, as in ``run.py``);
* ``wiki_heldout``: windows of the bundled ``wiki`` corpus that share no 16-token run with any calibration
  window (the calibration domain, unseen text);
* ``mobydick``: the bundled Moby-Dick corpus (a third domain).

Each case also records the summed layer-wise reconstruction error ``Σ tr(ΔW G ΔWᵀ)`` over the 210 linears, the
quantity every variant minimises on the calibration data.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import REFERENCE, add_worker_args, heldout, run_cases  # noqa: E402


def parse_variant(case: str) -> tuple[int, str, str]:
  """``"50:cubic:row"`` -> ``(50, "cubic", "row")``; ``ValueError`` for anything else."""
  parts = case.split(":")
  if (len(parts) != 3 or not parts[0].isdigit() or parts[1] not in ("cubic", "final")
      or parts[2] not in ("row", "layer")):
    raise ValueError(f"case {case!r} is not SPARSITY%:{{cubic,final}}:{{row,layer}}, e.g. 50:cubic:row")
  return int(parts[0]), parts[1], parts[2]


def worker(args) -> None:
  import numpy as np

  from jaxprune.data import load_windows
  from jaxprune._evaluate import perplexity
  from jaxprune.io._load import load_model
  from jaxprune.prune import Unstructured
  from jaxprune.prune._job import prune
  from jaxprune.prune._sequential import PruneSpec

  model = load_model("smollm2-135m")
  calib = np.load(args.reference / "calib_512x64.npy")
  wiki = load_windows("wiki", tokenizer=model.tokenizer, seqlen=512, role="eval").tokens
  wiki, dropped = heldout(wiki, calib, args.windows)
  texts = {"austen": np.load(args.reference / "eval_512x128.npy"), "wiki_heldout": wiki,
           "mobydick": load_windows("mobydick", tokenizer=model.tokenizer, seqlen=512, role="eval",
                                    max_windows=args.windows).tokens}
  sparsity, schedule, scope = parse_variant(args.case)
  pattern = Unstructured(sparsity / 100, scope=scope)
  outcome = prune(model.params, model.config, PruneSpec("admm", pattern, (("schedule", schedule),)), calib,
                  progress=False)
  out = {"case": args.case, "prune_seconds": outcome.seconds, "sparsity": outcome.metadata["sparsity"],
         "reconstruction_error": sum(r["error"] for r in outcome.metadata["layers"]),
         "wiki_windows_overlapping_calibration_dropped": dropped, "windows": {k: len(v) for k, v in texts.items()}}
  for name, tokens in texts.items():
    out[f"ppl_{name}"] = perplexity(outcome.params, tokens, config=model.config, progress=False).perplexity
  print(json.dumps(out))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", nargs="+", default=["50:cubic:row", "50:cubic:layer", "50:final:layer"],
                 help="SPARSITY%%:SCHEDULE:SCOPE")
  p.add_argument("--windows", type=int, default=32, help="windows of wiki_heldout and mobydick")
  p.add_argument("--reference", type=Path, default=REFERENCE)
  p.add_argument("--out", type=Path, default=Path(__file__).with_name("admm_schedules.json"))
  add_worker_args(p)
  args = p.parse_args()
  if args.worker:
    return worker(args)
  for case in args.cases:
    try:
      parse_variant(case)
    except ValueError as e:
      p.error(str(e))
  run_cases(Path(__file__), args.cases, args.out, "--windows", str(args.windows), "--reference", str(args.reference))

if __name__ == "__main__":
  main()
