"""bfloat16 (and float16) against float32 on the embedded model: perplexity of the dense model and after Wanda
50 %, each case one ``jaxprune`` command in its own process.

    python experiments/dtypes/run.py                 # the cases of config.json not yet in result.json
    python experiments/dtypes/run.py --only-report   # table.md from result.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import command, machine, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent


def cli(cfg: dict, case: str, out: Path) -> list[str]:
  """The ``jaxprune`` command of ``case`` (``eval:DTYPE`` or ``METHOD:DTYPE``) writing its JSON to ``out``."""
  kind, dtype = case.split(":")
  ev = cfg["eval"]
  common = ["--model", cfg["model"], "--dtype", dtype, "--batch-size", str(cfg["batch_size"])]
  if kind == "eval":
    return ["jaxprune", "eval", *common, "--data", ev["data"], "--seqlen", str(ev["seqlen"]), "--max-windows",
            str(ev["windows"]), "--json", str(out)]
  p = cfg["prune"]
  assert kind == p["method"], case
  return ["jaxprune", "prune", *common, "--method", kind, "--sparsity", str(p["sparsity"]), "--calib", p["calib"],
          "--nsamples", str(p["nsamples"]), "--seqlen", str(p["seqlen"]), "--eval", ev["data"], "--eval-seqlen",
          str(ev["seqlen"]), "--max-eval-windows", str(ev["windows"]), "--out", str(out.parent / "ck"), "--json",
          str(out)]


def run_case(cfg: dict, case: str) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "result.json"
    argv = cli(cfg, case, out)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jaxprune", *argv[1:]], capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    doc = json.loads(out.read_text())
  ev = doc["eval"]
  shown = [a if a != str(out) else "RESULT.json" for a in argv]
  run = {"cli": " ".join(a if a != str(out.parent / "ck") else "CHECKPOINT" for a in shown), "dtype": ev["dtype"],
         "perplexity": ev["perplexity"], "mean_loss": ev["mean_loss"], "eval_tokens_per_second":
         ev["tokens_per_second"], "process_seconds": round(time.perf_counter() - start, 1),
         "date": time.strftime("%Y-%m-%d")}
  if "prune_seconds" in doc:
    run.update(prune_seconds=doc["prune_seconds"], sparsity=doc["sparsity"])
  return run


def table(result: dict) -> str:
  runs = result["runs"]
  lines = ["| case | dtype | perplexity | vs float32 | mean loss |", "|---|---|---|---|---|"]
  for case, r in runs.items():
    kind = case.split(":")[0]
    base = runs.get(f"{kind}:float32")
    delta = "" if base is None or case == f"{kind}:float32" else f"{r['perplexity'] / base['perplexity'] - 1:+.2%}"
    name = "dense" if kind == "eval" else f"{kind} 50 %"
    lines.append(f"| {name} | {r['dtype']} | {r['perplexity']:.4f} | {delta} | {r['mean_loss']:.5f} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", type=Path, default=HERE / "config.json")
  parser.add_argument("--only-report", action="store_true")
  args = parser.parse_args()
  cfg = json.loads(args.config.read_text())
  out = HERE / "result.json"
  result = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
  if not args.only_report:
    for case in cfg["cases"]:
      if case in result["runs"]:
        continue
      print(f"== {case}", flush=True)
      result["runs"][case] = run_case(cfg, case)
      print(json.dumps(result["runs"][case]), flush=True)
      result.update(command=command(Path(__file__)), config=cfg, machine=machine())
      write_json(out, result)
  (HERE / "table.md").write_text(table(result))
  print(table(result))


if __name__ == "__main__":
  main()
