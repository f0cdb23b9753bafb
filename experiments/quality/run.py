"""Perplexity of every method at every sparsity, on the embedded model and the bundled texts, from one config.

  python experiments/quality/run.py                  # every case of config.json; resumes from result.json
  python experiments/quality/run.py --only-report    # table.md and perplexity.png from result.json

Writes ``result.json`` (one entry per case, rewritten after each, so an interrupted run resumes where it
stopped), ``table.md`` and ``perplexity.png``. Patterns: ``uNN`` = NN % unstructured, ``N:M`` = N kept of M.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import add_worker_args, parse_case, peak_rss_gb, run_cases  # noqa: E402


def worker(args) -> None:
  import jaxprune as jp

  cfg = json.loads(args.config.read_text())
  model = jp.load_model(cfg["model"])
  evals = jp.load_windows(cfg["eval"], tokenizer=model.tokenizer, seqlen=cfg["seqlen"], role="eval",
                          max_windows=cfg["eval_windows"])
  out = {"case": args.case}
  params = model.params
  if args.case != "dense":
    method, pattern = parse_case(args.case)
    calib = jp.load_windows(cfg["calib"], tokenizer=model.tokenizer, seqlen=cfg["seqlen"], role="calib",
                            nsamples=cfg["nsamples"], seed=cfg["seed"])
    outcome = jp.prune(params, calib.tokens, config=model.config, spec=jp.PruneSpec(method, pattern), progress=False)
    params = outcome.params
    out.update(prune_seconds=outcome.seconds, sparsity=outcome.metadata["sparsity"], calib_sha256=calib.sha256)
  result = jp.perplexity(params, evals.tokens, config=model.config, progress=False)
  out.update(perplexity=result.perplexity, eval_tokens=result.tokens, eval_sha256=evals.sha256,
             peak_rss_gb=peak_rss_gb())
  print(json.dumps(out))


def table(cfg: dict, runs: dict) -> str:
  head = "| method | " + " | ".join(cfg["patterns"]) + " |\n|---|" + "---|" * len(cfg["patterns"]) + "\n"
  rows = [f"| dense | {runs['dense']['perplexity']:.2f} (all) |" + " |" * (len(cfg["patterns"]) - 1)] \
      if "dense" in runs else []
  for method in cfg["methods"]:
    cells = [f"{runs[c]['perplexity']:.2f}" if (c := f"{method}:{p}") in runs else "—" for p in cfg["patterns"]]
    rows.append(f"| {method} | " + " | ".join(cells) + " |")
  return head + "\n".join(rows) + "\n"


def plot(cfg: dict, runs: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1.3]})
  unstructured = [p for p in cfg["patterns"] if p.startswith("u")]
  nm = [p for p in cfg["patterns"] if not p.startswith("u")]
  for i, method in enumerate(cfg["methods"]):
    xs = [int(p[1:]) for p in unstructured if f"{method}:{p}" in runs]
    ys = [runs[f"{method}:{p}"]["perplexity"] for p in unstructured if f"{method}:{p}" in runs]
    ax.plot(xs, ys, marker="o", label=method)
    bx.plot([j + 0.1 * (i - 1.5) for j, p in enumerate(nm) if f"{method}:{p}" in runs],
            [runs[f"{method}:{p}"]["perplexity"] for p in nm if f"{method}:{p}" in runs], "o", label=method)
  if "dense" in runs:
    for a in (ax, bx):
      a.axhline(runs["dense"]["perplexity"], color="gray", ls="--", label="dense")
  ax.set(yscale="log", xlabel="unstructured sparsity (%)", ylabel=f"perplexity ({cfg['eval']}, seqlen {cfg['seqlen']})",
         title=f"{cfg['model']}: one-shot pruning")
  bx.set(yscale="log", xticks=range(len(nm)), xticklabels=nm, xlabel="N:M (N kept of M)", title="semi-structured")
  ax.legend()
  ax.grid(True, which="both", alpha=0.3)
  bx.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", type=Path, default=Path(__file__).with_name("config.json"))
  p.add_argument("--out", type=Path, default=Path(__file__).parent)
  p.add_argument("--only-report", action="store_true", help="rewrite table and plot from result.json")
  add_worker_args(p)
  args = p.parse_args()
  if args.worker:
    return worker(args)
  cfg = json.loads(args.config.read_text())
  cases = ["dense"] + [f"{m}:{p}" for p in cfg["patterns"] for m in cfg["methods"]]
  runs = run_cases(Path(__file__), [] if args.only_report else cases, args.out / "result.json", "--config",
                   str(args.config), config=cfg)
  (args.out / "table.md").write_text(table(cfg, runs))
  plot(cfg, runs, args.out / "perplexity.png")
  print(table(cfg, runs))


if __name__ == "__main__":
  main()
