"""Whole-model pruning seconds of jaxprune against the reference implementations, on the parity benchmark's tokens,
in the references' order of work (``default``) and in jaxprune's one-forward-per-block order (``true_sequential``).

  python experiments/prune_speed/run.py                  # every case of config.json -> result.json, table.md
  python experiments/prune_speed/run.py --only-report    # table.md from result.json

Each case runs in a fresh process through ``experiments/parity/run.py`` (same model, tokens and
hyper-parameters). ``prune_seconds`` is the whole pruning call (calibration forwards, statistics, compilation,
solvers, recomputing outputs), excluding model load and evaluation, as the references' ``prune_seconds``. An
order with ``"evaluate": true`` also evaluates its pruned models (its perplexities differ from the default
order's by float32 rounding). Time on an idle machine and compare ratios: on a shared one the seconds move.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import REPO, command, machine, run_worker, write_json  # noqa: E402

PARITY = REPO / "experiments" / "parity" / "run.py"


def one_case(case: str, order: str, evaluate: bool, parity_config: Path) -> dict:
  """One case in a fresh process, with the reference's figures and the ratios beside it."""
  cfg = json.loads(parity_config.read_text())
  reference_dir = REPO / cfg["reference"]
  args = ["--case", case, "--config", str(parity_config), "--reference", str(reference_dir), "--batch-size",
          str(cfg["batch_size"]), "--window-order", "0"]
  args += ([] if evaluate else ["--no-eval"]) + (["--true-sequential"] if order == "true_sequential" else [])
  run = run_worker(PARITY, *args)
  ref = json.loads((reference_dir / "results.json").read_text())["runs"][case]
  run["reference"] = {k: ref.get(k) for k in ("ppl", "prune_seconds", "peak_rss_gb")}
  run["speedup_over_reference"] = ref["prune_seconds"] / run["prune_seconds"]
  if run.get("ppl"):
    run["ppl_ratio_to_reference"] = run["ppl"] / ref["ppl"]
  return run


def table(orders: dict) -> str:
  """Markdown table: one row per order and case."""
  lines = ["| order | case | reference prune s | jaxprune prune s | speed-up | jaxprune peak RSS GB (prune) "
           "| reference ppl | jaxprune ppl |", "|---|---|---|---|---|---|---|---|"]
  for order, runs in orders.items():
    for case, r in runs.items():
      ppl = f"{r['ppl']:.4f}" if r.get("ppl") else "—"
      lines.append(f"| {order} | {case} | {r['reference']['prune_seconds']:.1f} | {r['prune_seconds']:.1f} | "
                   f"{r['speedup_over_reference']:.2f} | {r['peak_rss_gb_prune']:.2f} | "
                   f"{r['reference']['ppl']:.4f} | {ppl} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", type=Path, default=Path(__file__).with_name("config.json"))
  p.add_argument("--out", type=Path, default=Path(__file__).parent)
  p.add_argument("--only-report", action="store_true", help="rewrite table.md from result.json")
  args = p.parse_args()
  cfg = json.loads(args.config.read_text())
  path = args.out / "result.json"
  if args.only_report:
    orders = json.loads(path.read_text())["orders"]
  else:
    orders = {}
    for order, spec in cfg["orders"].items():
      orders[order] = {}
      for case in spec["cases"]:
        print(f"== {order} {case}", flush=True)
        orders[order][case] = one_case(case, order, spec["evaluate"], REPO / cfg["parity_config"])
        print(json.dumps(orders[order][case]), flush=True)
        write_json(path, {"command": command(Path(__file__)), "machine": machine(), "config": cfg, "orders": orders})
  (args.out / "table.md").write_text(table(orders))
  print(table(orders))


if __name__ == "__main__":
  main()
