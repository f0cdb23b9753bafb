"""What the command line's persistent compilation cache saves: one ``jaxprune prune`` command run three times in
fresh processes, with the cache off, then into an empty cache folder, then from that folder. Records each run's
wall seconds, the command's own ``seconds`` and the pass's ``prune_seconds`` (from ``--json``), and the cache's
files and bytes -> ``compile_cache.json``.

  python experiments/prune_speed/compile_cache.py                       # SparseGPT 50 %, 16 x 512 calibration
  python experiments/prune_speed/compile_cache.py --method wanda --nsamples 64
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import command, machine, write_json  # noqa: E402


def run(args: list[str], cache: str, tmp: Path, name: str) -> dict:
  out, doc = tmp / name, tmp / f"{name}.json"
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "jaxprune", *args, "--out", str(out), "--json", str(doc)], check=True,
                 env={**os.environ, "JAXPRUNE_COMPILATION_CACHE": cache}, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  wall = time.perf_counter() - start
  result = json.loads(doc.read_text())
  return {"wall_seconds": round(wall, 2), "command_seconds": round(result["seconds"], 2),
          "prune_seconds": result["prune_seconds"]}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--method", default="sparsegpt")
  p.add_argument("--nsamples", default="16")
  p.add_argument("--out", type=Path, default=Path(__file__).with_name("compile_cache.json"))
  a = p.parse_args()
  args = ["prune", "--method", a.method, "--sparsity", "0.5", "--nsamples", a.nsamples]
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    cache = tmp / "cache"
    runs = {}
    for name, setting in (("off", "0"), ("cold", str(cache)), ("warm", str(cache))):
      runs[name] = run(args, setting, tmp, name)
      print(name, runs[name], flush=True)
    files = [f for f in cache.rglob("*") if f.is_file()]
    result = {"command": command(Path(__file__)), "machine": machine(), "jaxprune_args": args, "runs": runs,
              "cache_files": len(files), "cache_bytes": sum(f.stat().st_size for f in files)}
  write_json(a.out, result)


if __name__ == "__main__":
  main()
