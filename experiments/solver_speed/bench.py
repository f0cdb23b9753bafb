"""Mask selection and per-solver seconds on LLaMA-7B-shaped matrices, against NumPy and a plain ``jnp.matmul`` on the
same machine, same run.

  python experiments/solver_speed/bench.py                  # settings of config.json -> result.json, table.md
  python experiments/solver_speed/bench.py --only-report    # table.md from result.json

Shapes ``(d_out, d_in)``: 4096×4096 (q/k/v/o) and 11008×4096 (gate/up). The Gram comes from random correlated
inputs. Selection: the keep mask alone (``pattern_mask``, jitted) from magnitude's ``|W|`` and Wanda's
``|W|·sqrt(s)`` on the device, per layer, per row and 2:4, each beside NumPy on the same scores on the host:
``np.partition`` of the flattened scores (the global threshold), ``np.argpartition`` along the rows (per row) and
along groups of 4 (2:4). Solvers: with the reconstruction error (the default) and without (``with_error=False``).
Everything is compiled first (compile seconds reported apart), then timed over ``--repeats`` runs (the best
counts). ``gflops`` is the solver's dominant arithmetic (dense linear algebra, counted below) over its wall time
without the error; compare it with the matmul's to see whether a solver is matmul-bound or loop-bound.
"""
from __future__ import annotations

import argparse
import json
import functools
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import command, machine, write_json  # noqa: E402
from jaxprune import NM, Stats, Unstructured, admm, magnitude, sparsegpt, wanda  # noqa: E402
from jaxprune.prune import pattern_mask  # noqa: E402
from jaxprune.prune.solvers._wanda import wanda_scores  # noqa: E402

SELECTIONS = {"layer u50": Unstructured(0.5, scope="layer"), "row u50": Unstructured(0.5, scope="row"),
              "2:4": NM(2, 4)}


def flops(method: str, d_out: int, d_in: int, iterations: int = 20) -> float:
  """Dominant flops: SparseGPT = Cholesky and inverse (~2 d_in³) + OBS updates (d_out d_in²);
  ADMM = factorisation (~d_in³) + (iterations + 1) products of (d_in × d_in) by (d_in × d_out)."""
  if method == "sparsegpt":
    return 2.0 * d_in**3 + 1.0 * d_out * d_in**2
  if method == "admm":
    return 1.0 * d_in**3 + (iterations + 1) * 2.0 * d_in**2 * d_out
  return 0.0


def timed(fn, *args, repeats: int):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_and_first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return compile_and_first, min(times)


def timed_host(fn, *args, repeats: int) -> float:
  """Best seconds of ``repeats`` calls of a host (NumPy) function."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(*args)
    times.append(time.perf_counter() - start)
  return min(times)


def selection_timings(w, stats, *, repeats: int) -> dict:
  """Seconds of the keep mask alone from magnitude's and Wanda's scores, each pattern of :data:`SELECTIONS`, and of
  NumPy's counterpart on the same scores: ``np.partition`` (global threshold), ``np.argpartition`` per row and per
  group of 4. NumPy returns a threshold or indices, jaxprune the exact mask with its tie rule."""
  d_out, d_in = w.shape
  scores = {"magnitude": jax.jit(jnp.abs)(w), "wanda": jax.jit(wanda_scores)(w, stats.sq_norms)}
  numpy = {"layer u50": ("np.partition", lambda h: np.partition(h.ravel(), d_out * d_in // 2)),
           "row u50": ("np.argpartition", lambda h: np.argpartition(h, d_in // 2, axis=1)),
           "2:4": ("np.argpartition of 4", lambda h: np.argpartition(h.reshape(-1, 4), 2, axis=1))}
  out = {}
  for score_name, s in scores.items():
    host = np.asarray(s)
    for name, pattern in SELECTIONS.items():
      fn = jax.jit(functools.partial(pattern_mask, pattern=pattern, default_scope="row"))
      first, best = timed(fn, s, repeats=repeats)
      reference, host_fn = numpy[name]
      host_best = timed_host(host_fn, host, repeats=repeats)
      out[f"{score_name} {name}"] = {"seconds": best, "compile_and_first_seconds": first, "numpy": reference,
                                     "numpy_seconds": host_best, "ratio": best / host_best}
      print(score_name, name, out[f"{score_name} {name}"], flush=True)
  return out


def problem(d_out: int, d_in: int, tokens: int, key):
  k1, k2, k3 = jax.random.split(key, 3)
  mix = jax.random.normal(k1, (d_in, d_in), jnp.float32) / np.sqrt(d_in)
  x = jax.random.normal(k2, (tokens, d_in), jnp.float32) @ (jnp.eye(d_in) + 0.5 * mix)
  gram = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
  stats = Stats(gram=gram, sq_norms=jnp.diagonal(gram), count=jnp.float32(tokens))
  return jax.random.normal(k3, (d_out, d_in), jnp.float32) / np.sqrt(d_in), stats


def surgeon_timings(d_out: int, d_in: int, tokens: int, *, chunk: int = 64) -> dict:
  """LLM Surgeon's per-linear functions (``jaxprune.prune._surgeon_pass``) on one ``(d_out, d_in)`` weight with
  ``A`` from ``tokens`` correlated inputs and ``G`` from as many correlated output gradients: the two damped
  inverses, the element and the row/column costs, 20 % of rows and 20 % of columns removed, and the chunked
  element update (chunks of ``chunk``) timed on the first 16 rows at 50 % (one window of held-back rows: its
  chunks and the one update of all rows) and extrapolated to all ``d_out / 16`` windows, plus the fixed part
  measured with nothing removed. One compiling run, one timed run each."""
  from jaxprune.prune import _surgeon_pass as SP

  w, stats = problem(d_out, d_in, tokens, jax.random.key(0))
  a = stats.gram / tokens
  _, g_stats = problem(d_in, d_out, tokens, jax.random.key(1))
  g = g_stats.gram / tokens
  out = {}
  inverses = functools.partial(SP.linear_inverses, damping_a=0.01, damping_g=0.1)
  first, best = timed(inverses, a, g, repeats=1)
  out["damped inverses of A and G"] = {"seconds": best, "compile_and_first_seconds": first}
  inv = inverses(a, g)
  for kind in ("element", "rows_columns"):
    first, best = timed(functools.partial(SP.linear_costs, kind=kind), w, a, g, inv, repeats=1)
    out[f"costs {kind}"] = {"seconds": best, "compile_and_first_seconds": first}
  rows, cols = jnp.asarray(np.arange(d_out) % 5 != 0), jnp.asarray(np.arange(d_in) % 5 != 0)
  first, best = timed(SP.update_rows_columns, w, a, g, inv, rows, cols, repeats=1)
  out["update rows+columns 20 %"] = {"seconds": best, "compile_and_first_seconds": first}
  window = 16  # rows whose update remove_elements holds back and applies at once
  _, fixed = timed(functools.partial(SP.update_elements, chunk=chunk), w, a, g, inv,
                   jnp.ones((d_out, d_in), bool), repeats=1)  # nothing removed: sorting the mask, the error
  keep = jnp.asarray(~((np.arange(d_out)[:, None] < window) & (np.arange(d_in)[None, :] % 2 == 0)))
  first, best = timed(functools.partial(SP.update_elements, chunk=chunk), w, a, g, inv, keep, repeats=1)
  windows = -(-d_out // window)
  out["update elements 50 %"] = {"seconds_per_window": best - fixed, "windows": windows, "chunk": chunk,
                                 "fixed_seconds": fixed, "seconds": fixed + (best - fixed) * windows,
                                 "extrapolated_from_rows": window, "compile_and_first_seconds": first}
  return out


def surgeon_table(result: dict) -> str:
  """Markdown table of :func:`surgeon_timings` per shape."""
  shapes = list(result.get("surgeon", {}))
  if not shapes:
    return ""
  steps = list(result["surgeon"][shapes[0]])
  rows = ["| surgeon step | " + " | ".join(shapes) + " |", "|---|" + "---|" * len(shapes)]
  for step in steps:
    cells = []
    for shape in shapes:
      r = result["surgeon"][shape][step]
      if "windows" in r and r["seconds_per_window"] <= 0:  # one timed run each: noise above the window's work
        cells.append(f"not resolved: 16 rows ran no longer than the fixed part ({r['fixed_seconds']:.1f} s)")
        continue
      cells.append(f"{r['seconds']:.1f} s" + (f" ({r['windows']} × {r['seconds_per_window']:.2f} s, extrapolated)"
                                              if "windows" in r else ""))
    rows.append(f"| {step} | " + " | ".join(cells) + " |")
  return "\n".join(rows) + "\n"


def selection_table(result: dict) -> str:
  """Markdown table: seconds of each selection per shape, NumPy's beside it, and their ratio."""
  shapes = sorted(result["selection"], key=lambda s: [int(x) for x in s.split("x")])
  rows = ["| selection | " + " | ".join(f"{s} jaxprune | {s} NumPy | ratio" for s in shapes) + " |",
          "|---|" + "---|" * (3 * len(shapes))]
  for key in (f"{score} {name}" for score in ("magnitude", "wanda") for name in SELECTIONS):
    runs = [result["selection"][shape][key] for shape in shapes]
    cells = [f"{r['seconds']:.3g} s | {r['numpy_seconds']:.3g} s | {r['ratio']:.2f}" for r in runs]
    rows.append(f"| {key} ({runs[0]['numpy']}) | " + " | ".join(cells) + " |")
  return "\n".join(rows) + "\n"


def table(result: dict) -> str:
  """Markdown tables: the selections against NumPy; seconds per solver and shape with the error / without it, and
  the solver's FLOP/s (without the error) as a fraction of the matmul's."""
  shapes = sorted({k.split()[1] for k in result["solvers"]}, key=lambda s: [int(x) for x in s.split("x")])
  cols = [(shape, pattern) for shape in shapes for pattern in ("u50", "2:4")]
  rows = ["| solver (with error / without) | " + " | ".join(f"{s} {p}" for s, p in cols)
          + " | fraction of matmul FLOP/s |", "|---|" + "---|" * (len(cols) + 1)]
  for name in ("magnitude", "wanda", "sparsegpt", "admm"):
    runs = [result["solvers"].get(f"{name} {s} {p}") for s, p in cols]
    if not any(runs):
      continue
    cells = [f"{r['seconds']:.3g} s / {r['seconds_without_error']:.3g} s" if r else "—" for r in runs]
    fractions = [r["fraction_of_matmul"] for r in runs if r and r["fraction_of_matmul"]]
    share = f"{min(fractions):.2f}–{max(fractions):.2f}" if fractions else "—"
    rows.append(f"| {name} | " + " | ".join(cells) + f" | {share} |")
  load = result.get("load_average")
  load = f" Load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f}." if load else ""
  surgeon = surgeon_table(result)
  return (selection_table(result) + "\n" + "\n".join(rows)
          + f"\n\nPlain `jnp.matmul` 4096³: {result['matmul_4096_gflops']:.1f} GFLOP/s, same run.{load}\n"
          + (f"\n{surgeon}\nSurgeon timed in a run of its own{result['surgeon_run']}.\n" if surgeon else ""))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", type=Path, default=Path(__file__).with_name("config.json"))
  p.add_argument("--shapes", help="comma-separated d_outxd_in [config]")
  p.add_argument("--tokens", type=int, help="inputs behind the Gram [config]")
  p.add_argument("--repeats", type=int,
                 help="timed runs after the compiling one, solvers and selections; the best counts [config]")
  p.add_argument("--solvers", help="comma-separated solvers to time [config]")
  p.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for result.json and table.md")
  p.add_argument("--only-report", action="store_true", help="rewrite table.md from result.json")
  p.add_argument("--only-surgeon", action="store_true",
                 help="time LLM Surgeon's per-linear functions and add them to the existing result.json")
  args = p.parse_args()
  if args.only_report:
    (args.out / "table.md").write_text(table(json.loads((args.out / "result.json").read_text())))
    return
  cfg = json.loads(args.config.read_text())
  shapes = args.shapes.split(",") if args.shapes else cfg["shapes"]
  tokens, repeats = args.tokens or cfg["tokens"], args.repeats or cfg["repeats"]
  selection_repeats = args.repeats or cfg["selection_repeats"]
  if args.only_surgeon:
    result = json.loads((args.out / "result.json").read_text())
    _, mm_seconds = timed(jax.jit(lambda x: jnp.matmul(x, x)), jnp.ones((4096, 4096), jnp.float32), repeats=3)
    gflops = 2 * 4096**3 / mm_seconds / 1e9
    result["surgeon"] = {}
    result["surgeon_run"] = f" ({command(Path(__file__))}, {machine()['date']}, matmul 4096³ {gflops:.1f} GFLOP/s)"
    for shape in shapes:
      result["surgeon"][shape] = surgeon_timings(*map(int, shape.split("x")), tokens)
      print(shape, result["surgeon"][shape], flush=True)
    write_json(args.out / "result.json", result)
    (args.out / "table.md").write_text(table(result))
    print(table(result))
    return
  a = jnp.ones((4096, 4096), jnp.float32)
  mm = jax.jit(lambda x: jnp.matmul(x, x))
  _, mm_seconds = timed(mm, a, repeats=3)
  result = {"command": command(Path(__file__)), "machine": machine(), "config": cfg,
            "device": str(jax.devices()[0]), "backend": jax.default_backend(),
            "matmul_4096_gflops": 2 * 4096**3 / mm_seconds / 1e9, "selection": {}, "solvers": {}}
  load_start = os.getloadavg()[0]
  print(f"matmul 4096^3: {result['matmul_4096_gflops']:.1f} GFLOP/s, load {load_start:.2f}", flush=True)
  solvers = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt, "admm": admm}
  names = args.solvers.split(",") if args.solvers else cfg["solvers"]
  for shape in shapes:
    d_out, d_in = map(int, shape.split("x"))
    w, stats = problem(d_out, d_in, tokens, jax.random.key(0))
    result["selection"][shape] = selection_timings(w, stats, repeats=selection_repeats)
    for name in names:
      for pattern in (Unstructured(0.5), NM(2, 4)):
        key = f"{name} {shape} {'2:4' if isinstance(pattern, NM) else 'u50'}"
        runs = {}
        for with_error in (True, False):
          fn = jax.jit(functools.partial(solvers[name], pattern=pattern, with_error=with_error))
          runs[with_error] = timed(fn, w, stats, repeats=repeats)
        f = flops(name, d_out, d_in)
        best = runs[False][1]
        result["solvers"][key] = {"seconds": runs[True][1], "seconds_without_error": best,
                                  "compile_and_first_seconds": runs[True][0],
                                  "gflops": f / best / 1e9 if f else None,
                                  "fraction_of_matmul": (f / best / 1e9) / result["matmul_4096_gflops"] if f else None}
        print(key, result["solvers"][key], flush=True)
  result["load_average"] = [load_start, os.getloadavg()[0]]
  previous = args.out / "result.json"
  if previous.is_file():  # LLM Surgeon's timings come from their own run (--only-surgeon): kept
    result.update({k: v for k, v in json.loads(previous.read_text()).items() if k in ("surgeon", "surgeon_run")})
  write_json(args.out / "result.json", result)
  (args.out / "table.md").write_text(table(result))
  print(table(result))


if __name__ == "__main__":
  main()
