"""jaxprune against the original PyTorch implementations, on the exact tokens they were run on.

``reference/`` holds the calibration windows (64 x 512) and evaluation windows (128 x 512) on which sparsegpt,
wanda and admm-pruning were measured, with their perplexities, pruning seconds and peak memory. This script runs
jaxprune's side of every case of ``config.json`` on the same tokens, each case in a fresh process:

  python experiments/parity/run.py                      # every case -> result.json and table.md
  python experiments/parity/run.py --cases wanda:u50 sparsegpt:2:4 --out runs/some.json

Case names follow ``results.json``: ``METHOD:uNN`` (unstructured NN %) or ``METHOD:N:M`` (N kept of M).
``prune_seconds`` counts the whole pruning call (calibration forwards, statistics, compilation, solvers,
recomputing outputs), excluding model load and evaluation, like the reference's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import (  # noqa: E402
    REPO, add_worker_args, command, machine, parse_case, peak_rss_gb, reorder, run_worker, write_json)


def worker(args) -> None:
  import numpy as np

  import jaxprune as jp

  cfg = json.loads(args.config.read_text())
  model = jp.load_model(cfg["model"])
  calib = reorder(np.load(args.reference / cfg["calib"]), args.window_order)
  evals = np.load(args.reference / cfg["eval"])
  method, pattern = parse_case(args.case, args.scope)
  out = {"case": args.case}
  params = model.params
  if pattern is not None:
    hparams = tuple(json.loads(args.hparams).items()) if args.hparams else ()
    spec = jp.PruneSpec(method, pattern, hparams, true_sequential=args.true_sequential)
    outcome = jp.prune(params, calib, config=model.config, spec=spec, batch_size=args.batch_size, progress=False)
    params = outcome.params
    out.update(prune_seconds=outcome.seconds, measured_linear_sparsity=outcome.metadata["sparsity"],
               hparams=dict(hparams), true_sequential=args.true_sequential, pattern=repr(pattern),
               window_order=args.window_order)
  out["peak_rss_gb_prune"] = peak_rss_gb()
  if not args.no_eval:
    start = time.perf_counter()
    result = jp.perplexity(params, evals, config=model.config, batch_size=cfg["eval_batch_size"], progress=False)
    out.update(ppl=result.perplexity, eval_seconds=time.perf_counter() - start)
  out["peak_rss_gb"] = peak_rss_gb()
  print(json.dumps(out))


def table(runs: dict) -> str:
  """Markdown table: reference against jaxprune, per case."""
  lines = ["| case | reference ppl | jaxprune ppl | ratio | reference prune s | jaxprune prune s | speed-up "
           "| reference peak RSS GB | jaxprune peak RSS GB (prune) |", "|---|---|---|---|---|---|---|---|---|"]
  for case, r in sorted(runs.items()):
    ref = r.get("reference", {})
    fmt = lambda v, f="{:.2f}": "—" if v is None else f.format(v)  # noqa: E731
    cells = [fmt(ref.get("ppl"), "{:.4f}"), fmt(r.get("ppl"), "{:.4f}"), fmt(r.get("ppl_ratio_to_reference"), "{:.4f}"),
             fmt(ref.get("prune_seconds"), "{:.1f}"), fmt(r.get("prune_seconds"), "{:.1f}"),
             fmt(r.get("speedup_over_reference")), fmt(ref.get("peak_rss_gb")),
             fmt(r.get("peak_rss_gb_prune", r.get("peak_rss_gb")))]
    lines.append(f"| {case} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", type=Path, default=Path(__file__).with_name("config.json"))
  p.add_argument("--reference", type=Path, default=None, help="the reference folder [default: config's]")
  p.add_argument("--cases", nargs="*", default=None, help="default: the config's cases")
  p.add_argument("--batch-size", type=int, default=None, help="calibration windows per forward batch "
                 "[default: config's]")
  p.add_argument("--out", type=Path, default=Path(__file__).with_name("result.json"))
  p.add_argument("--no-eval", action="store_true",
                 help="time the pruning only; keep each case's perplexity from an earlier run in --out")
  p.add_argument("--true-sequential", action="store_true",
                 help="prune each block group by group (jaxprune's one-forward order; not the references')")
  p.add_argument("--scope", choices=("layer", "row"), default=None,
                 help="ranking scope of the unstructured cases [default: each method's]")
  p.add_argument("--window-order", type=int, default=0,
                 help="calibrate on the same windows permuted with this seed (0: as given)")
  add_worker_args(p)
  p.add_argument("--hparams", default="",
                 help="JSON of solver options for every case, e.g. '{\"schedule\": \"final\"}'")
  args = p.parse_args()
  cfg = json.loads(args.config.read_text())
  args.reference = args.reference or REPO / cfg["reference"]
  args.batch_size = args.batch_size or cfg["batch_size"]
  if args.worker:
    return worker(args)
  reference = json.loads((args.reference / "results.json").read_text())["runs"]
  cases = args.cases or cfg["cases"]
  previous = json.loads(args.out.read_text())["runs"] if args.out.is_file() else {}
  runs = dict(previous)
  for case in cases:
    print(f"== {case}", flush=True)
    extra = (["--hparams", args.hparams] if args.hparams else []) + (["--no-eval"] if args.no_eval else []) + (
        ["--true-sequential"] if args.true_sequential else []) + (["--scope", args.scope] if args.scope else [])
    fresh = run_worker(Path(__file__), "--case", case, "--config", str(args.config), "--reference",
                       str(args.reference), "--batch-size", str(args.batch_size), "--window-order",
                       str(args.window_order), *extra)
    runs[case] = {**runs.get(case, {}), **fresh}
    ref = reference.get(case, {})
    runs[case]["reference"] = {k: ref.get(k) for k in ("ppl", "prune_seconds", "peak_rss_gb")}
    if ref.get("ppl") and runs[case].get("ppl"):
      runs[case]["ppl_ratio_to_reference"] = runs[case]["ppl"] / ref["ppl"]
    if ref.get("prune_seconds") and runs[case].get("prune_seconds"):
      runs[case]["speedup_over_reference"] = ref["prune_seconds"] / runs[case]["prune_seconds"]
    print(json.dumps(runs[case]), flush=True)
    write_json(args.out, {"command": command(Path(__file__)), "machine": machine(), "config": cfg, "runs": runs})
  # result.json -> table.md; any other output (a variant run) -> its own NAME.md beside it
  (args.out.with_name("table.md") if args.out.name == "result.json" else args.out.with_suffix(".md")).write_text(
      table(runs))


if __name__ == "__main__":
  main()
