"""Helpers shared by the benchmark scripts: machine description, peak memory, JSON output."""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "experiments" / "parity" / "reference"  # the reference runs' token files and results
PACKAGES = ("jaxprune", "jax", "jaxlib", "numpy", "torch", "transformers")


def versions() -> dict:
  """Installed versions of the packages a benchmark's numbers depend on (``None``: not installed)."""
  from importlib.metadata import PackageNotFoundError, version

  found = {}
  for name in PACKAGES:
    try:
      found[name] = version(name)
    except PackageNotFoundError:
      found[name] = None
  return found


def machine() -> dict:
  """CPU, cores, date, Python and package versions of this run."""
  cpu = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
          "date": datetime.date.today().isoformat(), "versions": versions()}


def command(script: Path) -> str:
  """The command line of this run, with ``script`` relative to the repository."""
  return f"python {script.resolve().relative_to(REPO)} " + " ".join(sys.argv[1:])


def parse_case(case: str, scope: str | None = None):
  """``"METHOD:uNN"`` (unstructured NN %, ranked within ``scope``), ``"METHOD:N:M"`` (N kept of M) or ``"dense"``
  -> ``(method, pattern or None)``."""
  from jaxprune.prune import NM, Unstructured

  method, _, shape = case.partition(":")
  if method == "dense":
    return method, None
  if shape.startswith("u"):
    return method, Unstructured(int(shape[1:]) / 100, scope=scope)
  n, m = shape.split(":")
  return method, NM(int(n), int(m))


def reorder(windows, seed: int):
  """The calibration ``windows`` permuted with ``seed`` (0: as given): the same statistics up to float32
  rounding."""
  import numpy as np

  return windows[np.random.default_rng(seed).permutation(len(windows))] if seed else windows


def peak_rss_gb() -> float:
  """Peak resident memory of this process so far, in GB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def add_worker_args(parser) -> None:
  """The hidden options by which a script runs one case in a fresh process (see :func:`run_worker`)."""
  import argparse

  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--case", help=argparse.SUPPRESS)


def run_worker(script: Path, *args: str) -> dict:
  """Runs ``script --worker args`` in a fresh process (own peak memory) and returns the JSON it prints last."""
  proc = subprocess.run([sys.executable, str(script), "--worker", *args], capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"worker failed: {proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cases(script: Path, cases, out: Path, *worker_args: str, **header) -> dict:
  """Runs each case of ``cases`` not yet in ``out`` with :func:`run_worker` (``--case CASE *worker_args``),
  rewriting ``out`` after each (command, machine, ``header`` and the runs); returns every run."""
  runs = json.loads(out.read_text())["runs"] if out.is_file() else {}
  for case in cases:
    if case in runs:
      continue
    print(f"== {case}", flush=True)
    runs[case] = run_worker(script, "--case", case, *worker_args)
    print(json.dumps(runs[case]), flush=True)
    write_json(out, {"command": command(script), **header, "machine": machine(), "runs": runs})
  return runs


def write_json(path: Path, data: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
  print(f"wrote {path}")

