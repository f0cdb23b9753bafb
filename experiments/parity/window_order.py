"""How far float32 rounding alone moves a pruned perplexity: the same calibration windows in other orders.

  python experiments/parity/window_order.py --out experiments/parity/window_order.json

Permuting the 64 calibration windows changes no statistic mathematically (sums and means over the same
windows), only the order of float32 operations. Each case is pruned once per seed (seed 0: the windows as given)
by jaxprune (``run.py``'s worker, in a fresh process) and by the PyTorch implementation of the references'
pass ``torch_pass.py``; every model is evaluated on the 128 reference windows. If the reference's perplexity
lies inside the spread of the reorderings, a gap between jaxprune and the reference is rounding, not method.
Runs already in ``--out`` are kept.

With seed 0 the nonzero patterns of both implementations are also compared block by block: the fraction of
mask entries that differ shows where the two float32 computations part.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import REFERENCE, machine, run_worker, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent


def torch_pass(case: str, seed: int, reference: Path, masks: Path | None) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "result.json"
    cmd = [sys.executable, str(HERE / "torch_pass.py"), "--case", case, "--window-order", str(seed),
           "--reference", str(reference), "--out", str(out)] + (["--masks", str(masks)] if masks else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"torch_pass.py failed: {proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def divergence(a: Path, b: Path) -> list[float]:
  """Per block: the fraction of kept-weight mask entries (over the block's linears) on which ``a`` and ``b``
  differ."""
  import numpy as np

  with np.load(a) as x, np.load(b) as y:
    if sorted(x.files) != sorted(y.files):
      raise SystemExit(f"{a} and {b} hold different linears")
    differ, total = {}, {}
    for k in x.files:  # each entry read (and decompressed) once
      a, b, block = x[k], y[k], int(k.split("/")[0])
      differ[block] = differ.get(block, 0) + int(np.sum(a != b))
      total[block] = total.get(block, 0) + a.size
  return [differ[i] / total[i] for i in sorted(differ)]


def table(result: dict) -> str:
  seeds = result["seeds"]
  orders = " | ".join(f"order {s}" for s in seeds)
  lines = [f"| case | implementation | reference ppl | {orders} | mean | min / mean / max vs reference |",
           "|---" * (len(seeds) + 5) + "|"]
  for case, entry in result["cases"].items():
    ref = entry["reference_ppl"]
    for impl, ppls in entry["ppl"].items():
      values = [ppls[str(s)] for s in seeds if str(s) in ppls]
      mean = sum(values) / len(values)
      cells = " | ".join(f"{ppls[str(s)]:.2f}" if str(s) in ppls else "—" for s in seeds)
      lines.append(f"| {case} | {impl} | {ref:.4f} | {cells} | {mean:.2f} "
                   f"| {min(values) / ref:.4f} / {mean / ref:.4f} / {max(values) / ref:.4f} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--reference", type=Path, default=REFERENCE)
  p.add_argument("--cases", nargs="*", default=["wanda:u60", "sparsegpt:2:4"])
  p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3])
  p.add_argument("--out", type=Path, default=HERE / "window_order.json")
  args = p.parse_args()
  reference = json.loads((args.reference / "results.json").read_text())["runs"]
  for case in args.cases:
    if case not in reference:
      raise SystemExit(f"{case}: no reference result in {args.reference / 'results.json'}")
  result = json.loads(args.out.read_text()) if args.out.is_file() else {}
  result.update(command="python experiments/parity/window_order.py " + " ".join(sys.argv[1:]), machine=machine(),
                seeds=sorted(set(result.get("seeds", [])) | set(args.seeds)))
  cases = result.setdefault("cases", {})
  with tempfile.TemporaryDirectory() as tmp:
    for case in args.cases:
      entry = cases.setdefault(case, {"reference_ppl": reference[case]["ppl"], "ppl": {}})
      for seed in args.seeds:
        ppls = entry["ppl"]
        todo = [impl for impl in ("jaxprune", "torch") if str(seed) not in ppls.get(impl, {})]
        compare = seed == 0 and len(todo) == 2 and "mask_divergence_per_block" not in entry
        for impl in todo:
          print(f"== {case} {impl} order {seed}", flush=True)
          masks = Path(tmp) / f"{impl}.npz" if compare else None
          if impl == "torch":
            ppl = torch_pass(case, seed, args.reference, masks)["ppl"]
          else:
            ppl = run_worker(HERE / "run.py", "--case", case, "--reference", str(args.reference),
                             "--window-order", str(seed), *(["--masks", str(masks)] if masks else []))["ppl"]
          ppls.setdefault(impl, {})[str(seed)] = ppl
          print(f"   ppl {ppl:.4f}", flush=True)
          write_json(args.out, result)
        if compare:
          entry["mask_divergence_per_block"] = divergence(Path(tmp) / "jaxprune.npz", Path(tmp) / "torch.npz")
          write_json(args.out, result)
  args.out.with_suffix(".md").write_text(table(result))


if __name__ == "__main__":
  main()
