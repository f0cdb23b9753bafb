"""``table.md``, ``plot.png`` and ``plot_excess.png`` of the ADMM convergence experiment from its ``result.json``,
and the names of its runs (see ``run.py``)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

FAMILIES = ("admm", "adam", "sgd", "sgd_momentum")


def admm_name(hp: dict) -> str:
  return f"admm rho={hp['rho']:g} percdamp={hp['percdamp']:g}"


def grids(cfg: dict) -> list[tuple[str, str, float, list[float], bool]]:
  """``(family, optax kind, momentum, values, values in units of 1/L)`` of the gradient methods."""
  return [("adam", "adam", 0.0, cfg["adam_lr"], False), ("sgd", "sgd", 0.0, cfg["sgd_lr_times_inverse_l"], True),
          ("sgd_momentum", "sgd", cfg["sgd_momentum"], cfg["sgd_momentum_lr_times_inverse_l"], True)]


def run_names(cfg: dict) -> list[str]:
  """The name of every configured run, in the config's order."""
  return [admm_name(hp) for hp in cfg["admm"]] + [
      f"{family} lr={v:g}{'/L' if per_l else ''}" for family, _, _, values, per_l in grids(cfg) for v in values]


LABELS = {"admm_default": "ADMM default", "admm": "ADMM best", "adam": "Adam", "sgd": "SGD",
          "sgd_momentum": "SGD+momentum"}
KEY = ("ADMM default: ρ = 1, percdamp 0.1 (jaxprune's defaults); ADMM best, Adam, SGD, SGD+momentum (0.9): the "
       "setting of the grid lowest at the last iteration, per linear and sparsity.")


def best_runs(entry: dict, cfg: dict) -> dict:
  """``{label key: run name}``: the first ADMM setting (the default), and per family the run lowest at its last
  iteration."""
  runs = entry["runs"]
  out = {"admm_default": admm_name(cfg["admm"][0])}
  for family in FAMILIES:
    out[family] = min((n for n, r in runs.items() if r["family"] == family), key=lambda n: runs[n]["curve"][-1])
  return {k: out[k] for k in LABELS}


def iterations_within(curve: list[float], optimum: float, within: float) -> int | None:
  """The first iteration whose error is at most ``(1 + within)·optimum`` (None: not reached)."""
  return next((k for k, e in enumerate(curve) if e <= (1.0 + within) * optimum), None)


def _name(path: str) -> str:
  return path.rsplit("/", 1)[-1]


def _cases(result: dict):
  """``(path, layer, pattern, entry)`` in the config's order."""
  cfg = result["config"]
  for path in cfg["linears"]:
    layer = result["layers"][path]
    for case in cfg["patterns"]:
      yield path, layer, case, layer["patterns"][case]


def _row(*cells) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(*cells) -> list[str]:
  return [_row(*cells), "|" + "---|" * len(cells)]


def _errors(result: dict) -> list[str]:
  cfg = result["config"]
  steps, admm_steps = cfg["steps"], cfg["admm_steps"]
  columns = [("admm_default", 20), ("admm_default", admm_steps), ("admm", 20), ("admm", admm_steps)]
  columns += [(family, steps) for family in FAMILIES[1:]]
  names = (f"{LABELS[k]} @{it}" for k, it in columns)
  lines = _header("linear (d_out x d_in)", "sparsity", "no update", "optimum", *names)
  for path, layer, case, e in _cases(result):
    best, opt = best_runs(e, cfg), e["optimum"]
    cells = [f"{e['runs'][best[k]]['curve'][it] / opt:.4f}" for k, it in columns]
    lines.append(_row(f"{_name(path)} ({layer['shape'][0]} x {layer['shape'][1]})", case,
                      f"{e['runs'][best['admm']]['curve'][0] / opt:.3f}", f"{opt:.5g}", *cells))
  return lines


def _iterations(result: dict) -> list[str]:
  cfg = result["config"]
  lines = _header("linear", "sparsity", *LABELS.values())
  for path, _, case, e in _cases(result):
    cells = []
    for name in best_runs(e, cfg).values():
      its = [iterations_within(e["runs"][name]["curve"], e["optimum"], x) for x in cfg["within"]]
      cells.append(" / ".join("—" if i is None else str(i) for i in its) + f" ({name.split(' ', 1)[1]})")
    lines.append(_row(_name(path), case, *cells))
  return lines


def _milliseconds(result: dict) -> list[str]:
  cfg = result["config"]
  lines = _header("linear", "ADMM", "Adam", "SGD", "SGD+momentum", "ADMM setup", "W G matmul")
  for path in cfg["linears"]:
    t = result["layers"][path]["seconds_per_iteration"]
    lines.append(_row(_name(path), *(f"{1e3 * t[k]:.2f}" for k in (*FAMILIES, "admm_setup", "matmul"))))
  return lines


def _to_within(result: dict) -> list[str]:
  cfg = result["config"]
  lines = _header("linear", "sparsity", *LABELS.values())
  for path, layer, case, e in _cases(result):
    t, cells = layer["seconds_per_iteration"], []
    for name in best_runs(e, cfg).values():
      family = e["runs"][name]["family"]
      its = iterations_within(e["runs"][name]["curve"], e["optimum"], cfg["within"][-1])
      setup = t["admm_setup"] if family == "admm" else 0.0
      cells.append("—" if its is None else f"{1e3 * (setup + its * t[family]):.0f}")
    lines.append(_row(_name(path), case, *cells))
  return lines


def _grid(result: dict) -> list[str]:
  cases = list(_cases(result))
  lines = _header("setting", *(f"{_name(path)} {case}" for path, _, case, _ in cases))
  for name in run_names(result["config"]):
    lines.append(_row(name, *(f"{e['runs'][name]['curve'][-1] / e['optimum']:.4f}" for *_, e in cases)))
  return lines


def table(result: dict) -> str:
  """``table.md``: errors against the optimum, iterations and milliseconds to get near it, the whole grid."""
  cfg = result["config"]
  c, steps, admm_steps, within = cfg["calib"], cfg["steps"], cfg["admm_steps"], cfg["within"]
  near = " / ".join(f"{x:.0%}" for x in within)
  lines = [f"{cfg['model']}, block {cfg['layer']}; Gram of {result['tokens']} calibration tokens ({c['nsamples']} "
           f"x {c['seqlen']} of `{c['data']}`, seed {c['seed']}); fixed {cfg['mask']} mask (per row). Errors are "
           "relative, tr(ΔW G ΔWᵀ)/tr(W G Wᵀ); after `optimum`, error / optimum at the iteration given (ADMM "
           f"{admm_steps} iterations, gradient methods {steps}). {KEY}", "", *_errors(result), "",
           f"Iterations to get within {near} of the optimum (—: not within {admm_steps} ADMM or {steps} gradient "
           "iterations), and the setting:", "", *_iterations(result), "",
           f"Milliseconds per iteration (jitted loop of {cfg['timing_steps']} iterations, best of "
           f"{cfg['timing_repeats']}, after compilation), ADMM's one-off setup (Cholesky and inverse of a d_in x d_in "
           "matrix) and one W G product:", "", *_milliseconds(result), "",
           f"Milliseconds to get within {within[-1]:.0%} of the optimum: iterations x ms per iteration, plus the setup "
           "for ADMM (—: not reached):", "", *_to_within(result), "",
           "Every setting: error / optimum at its last iteration (the curves are in `result.json`):", "",
           *_grid(result)]
  return "\n".join(lines) + "\n"


def plot(result: dict, path: Path, *, excess: bool) -> None:
  """One panel per (pattern, linear): relative error (or its excess over the optimum) against iteration, log y."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cfg = result["config"]
  rows, cols = len(cfg["patterns"]), len(cfg["linears"])
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False, sharex=True)
  styles = {"admm_default": ("C3", "-"), "admm": ("C3", "--"), "adam": ("C2", "-"), "sgd": ("C0", ":"),
            "sgd_momentum": ("C0", "-")}
  for k, (lpath, _, case, e) in enumerate(_cases(result)):
    ax = axes[k % rows][k // rows]
    for key, name in best_runs(e, cfg).items():
      curve = np.asarray(e["runs"][name]["curve"])
      color, ls = styles[key]
      ax.plot(np.arange(len(curve)), curve / e["optimum"] - 1.0 if excess else curve, color=color, ls=ls,
              label=f"{LABELS[key]}: {name.split(' ', 1)[1]}")
    ax.axhline(cfg["within"][-1] if excess else e["optimum"], color="k", lw=0.8, ls="--",
               label=f"{cfg['within'][-1]:.0%} above the optimum" if excess else "optimum")
    ax.set_yscale("log")
    ax.set_title(f"{_name(lpath)} {case}", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=5.5)
    if k % rows == rows - 1:
      ax.set_xlabel("iteration", fontsize=8)
    if k < rows:
      ax.set_ylabel("error / optimum − 1" if excess else "relative error", fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=100)
  from PIL import Image  # matplotlib's own dependency

  Image.open(buffer).convert("RGB").quantize(colors=64).save(path, optimize=True)  # a few colours: 1/3 the bytes
  print(f"wrote {path}")
