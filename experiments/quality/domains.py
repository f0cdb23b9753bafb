"""Perplexity of pruned models on the calibration domain and off it, with the quality experiment's settings.

  python experiments/quality/domains.py --cases wanda:u60 sparsegpt:u60 --out experiments/quality/domains.json

Methods that update the remaining weights (SparseGPT, ADMM) fit them to the calibration text; Wanda and
magnitude only choose a mask. This script prunes as ``run.py`` does (``config.json``: calibration from the
bundled ``wiki`` text) and evaluates each model on ``austen`` (the table's evaluation text), on held-out
``wiki`` windows (sharing no 16-token run with any calibration window) and on ``mobydick``, so that an ordering
of methods can be read in and out of the calibration domain. Each case runs in a fresh process; the JSON is
rewritten after each, and cases already in it are skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import add_worker_args, heldout, parse_case, run_cases  # noqa: E402


def worker(args) -> None:
  from jaxprune.data import load_windows
  from jaxprune._evaluate import perplexity
  from jaxprune.io._load import load_model
  from jaxprune.prune._job import prune
  from jaxprune.prune._sequential import PruneSpec

  cfg = json.loads(args.config.read_text())
  model = load_model(cfg["model"])
  seqlen, n = cfg["seqlen"], cfg["eval_windows"]
  calib = load_windows(cfg["calib"], tokenizer=model.tokenizer, seqlen=seqlen, role="calib",
                       nsamples=cfg["nsamples"], seed=cfg["seed"]).tokens
  wiki, dropped = heldout(load_windows("wiki", tokenizer=model.tokenizer, seqlen=seqlen, role="eval").tokens,
                          calib, n)
  texts = {name: load_windows(name, tokenizer=model.tokenizer, seqlen=seqlen, role="eval", max_windows=n).tokens
           for name in ("austen", "mobydick")}
  texts["wiki_heldout"] = wiki
  params = model.params
  out = {"case": args.case, "wiki_windows_overlapping_calibration_dropped": dropped}
  if args.case != "dense":
    method, pattern = parse_case(args.case)
    outcome = prune(params, model.config, PruneSpec(method, pattern), calib, progress=False)
    params = outcome.params
    out["reconstruction_error"] = sum(r["error"] for r in outcome.metadata["layers"])
  for name, tokens in texts.items():
    out[f"ppl_{name}"] = perplexity(params, tokens, config=model.config, progress=False).perplexity
  print(json.dumps(out))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", type=Path, default=Path(__file__).with_name("config.json"))
  p.add_argument("--cases", nargs="+", default=["dense", "wanda:u60", "sparsegpt:u60"])
  p.add_argument("--out", type=Path, default=Path(__file__).with_name("domains.json"))
  add_worker_args(p)
  args = p.parse_args()
  if args.worker:
    return worker(args)
  run_cases(Path(__file__), args.cases, args.out, "--config", str(args.config),
            config=json.loads(args.config.read_text()))

if __name__ == "__main__":
  main()
