"""Tables (``table.md``) and the plot (``perplexity.png``) of a depth-pruning ``result.json``.

  python experiments/depth/report.py experiments/depth/result.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _ppl(cases: dict, metric: str, unit: str, k: int, recover: str) -> float | None:
  case = cases.get(f"ppl/{metric}/{unit}/{k}/{recover}")
  return None if case is None else case["perplexity"]


def _cell(value: float | None, dense: float) -> str:
  if value is None:
    return "—"
  mark = "**" if value <= 1.05 * dense else ""
  return f"{mark}{value:.2f}{mark}"


def _metrics(cfg: dict) -> list[str]:
  return cfg["metrics"] + cfg.get("extra_metrics", [])


def setup(result: dict) -> str:
  d = result["data"]
  c, e = d["calib"], d["eval"]
  out = (f"Model `{result['config']['model']}`; calibration `{c['data']}` {c['nsamples']} windows x {c['seqlen']} "
         f"tokens = {c['tokens']} tokens (seed {c['seed']}; loss and both Shapley estimates use the first "
         f"{result['config']['adaptive_windows']} windows = {d['adaptive_calib_tokens']} tokens); evaluation "
         f"`{e['data']}` {e['windows']} windows x {e['seqlen']} = {e['tokens']} tokens. Dense perplexity "
         f"{result['cases']['dense']['perplexity']:.3f}.\n\n"
         "| run | date | machine | load (1 min) at start / end | minutes | peak RSS | cases |\n"
         "|---|---|---|---|---|---|---|\n")
  for i, run in enumerate(result.get("runs", [])):
    m = run["machine"]
    load = f"{run['load_average_start'][0]:.1f} / {run.get('load_average_end', [float('nan')])[0]:.1f}"
    out += (f"| {i + 1} | {m['date']} | {m['note']} ({m['cpu']}, {m['cores']} cores) | {load} | "
            f"{run.get('seconds', 0) / 60:.1f} | {run.get('peak_rss_gb', 0):.1f} GB | "
            f"{_describe(run.get('cases', []))} |\n")
  return out


def _describe(cases: list[str]) -> str:
  """The cases of a run, grouped by kind: ``scores/…``, ``ppl/…``, others by name."""
  kinds = {}
  for key in cases:
    kinds.setdefault(key.split("/")[0], []).append(key)
  return ", ".join(f"{len(v)} {k}" for k, v in kinds.items()) or "—"


def metric_times(result: dict) -> str:
  cfg, cases = result["config"], result["cases"]
  out = "| metric | " + " | ".join(cfg["units"]) + " | calibration tokens |\n|---|" + "---|" * (
      len(cfg["units"]) + 1) + "\n"
  for metric in _metrics(cfg):
    cells = []
    for unit in cfg["units"]:
      s = cases.get(f"scores/{metric}/{unit}")
      cells.append("—" if s is None else f"{s['seconds']:.1f} s")
    s = cases.get(f"scores/{metric}/{cfg['units'][0]}", {})
    extra = {"shapley": f" ({cfg['shapley_samples']} permutations)",
             "shapley_near": f" ({cfg['shapley_samples']} rounds, {s.get('near', '?')} units removed per "
                             f"sub-network)"}.get(metric, "")
    out += f"| {metric} | " + " | ".join(cells) + f" | {s.get('calib_tokens', '—')}{extra} |\n"
  return out


def perplexity_tables(result: dict) -> str:
  cfg, cases = result["config"], result["cases"]
  dense = cases["dense"]["perplexity"]
  rc = cfg["recovery"]
  out = ""
  for unit in cfg["units"]:
    ks = sorted(set(cfg["grid"][unit]) | set(rc["grid"][unit]))
    out += f"\n**{unit}** (perplexity after removing k units; dense {dense:.2f}; bold: within +5 %)\n\n"
    out += "| ranking | recovery | " + " | ".join(f"k={k}" for k in ks) + " |\n|---|---|" + "---|" * len(ks) + "\n"
    rows = [(m, "none") for m in _metrics(cfg)] + [(rc["metric"], r) for r in rc["kinds"]]
    for metric, recover in rows:
      cells = [_cell(_ppl(cases, metric, unit, k, recover), dense) for k in ks]
      out += f"| {metric} | {recover} | " + " | ".join(cells) + " |\n"
  return out


def removable(result: dict, unit: str = "attention") -> str:
  """Largest k of the grid whose perplexity stays within +5 % of dense, per ranking and recovery."""
  cfg, cases = result["config"], result["cases"]
  dense = cases["dense"]["perplexity"]
  rc = cfg["recovery"]
  rows = [(m, "none") for m in _metrics(cfg)] + [(rc["metric"], r) for r in rc["kinds"]]
  out = f"| ranking | recovery | largest k tried (of {result.get('num_layers', '?')}) with perplexity <= 1.05 x " \
        f"dense | perplexity there |\n|---|---|---|---|\n"
  for metric, recover in rows:
    ks = sorted(k for k in set(cfg["grid"][unit]) | set(rc["grid"][unit])
                if _ppl(cases, metric, unit, k, recover) is not None)
    if not ks:
      continue
    ok = [k for k in ks if _ppl(cases, metric, unit, k, recover) <= 1.05 * dense]
    if ok:
      out += f"| {metric} | {recover} | {max(ok)} | {_ppl(cases, metric, unit, max(ok), recover):.2f} |\n"
    else:
      bound = "0" if min(ks) == 1 else f"fewer than {min(ks)} (k < {min(ks)} not tried)"
      out += f"| {metric} | {recover} | {bound} | {_ppl(cases, metric, unit, min(ks), recover):.2f} at k = " \
             f"{min(ks)} |\n"
  return out


def buy_back(result: dict) -> str:
  """Per unit and k: the share of the perplexity increase that each recovery removes."""
  cfg, cases = result["config"], result["cases"]
  dense = cases["dense"]["perplexity"]
  rc = cfg["recovery"]
  out = "| unit | k | none | " + " | ".join(rc["kinds"]) + " |\n|---|---|---|" + "---|" * len(rc["kinds"]) + "\n"
  for unit in cfg["units"]:
    for k in rc["grid"][unit]:
      base = _ppl(cases, rc["metric"], unit, k, "none")
      if base is None:
        continue
      cells = []
      for r in rc["kinds"]:
        v = _ppl(cases, rc["metric"], unit, k, r)
        gap = (base - v) / (base - dense) * 100 if v is not None and base > dense else float("nan")
        cells.append("—" if v is None else f"{v:.2f} ({gap:+.0f} % of the gap)")
      out += f"| {unit} | {k} | {base:.2f} | " + " | ".join(cells) + " |\n"
  return out


def learned_table(result: dict) -> str:
  """Closed-form against trained recovery per (unit, k) of ``learned_recovery``: perplexity, the share of the
  perplexity increase it removes, the calibration fit error and the fitting time."""
  cfg, cases = result["config"], result["cases"]
  lr = cfg.get("learned_recovery")
  if not lr:
    return "(not run)\n"
  dense = cases["dense"]["perplexity"]
  out = ("| unit | k | recovery | fit | perplexity | share of the gap | fit error (calibration) | fit seconds |\n"
         "|---|---|---|---|---|---|---|---|\n")
  settings = sorted({(u, k) for f in lr["fits"].values() for u, ks in f["grid"].items() for k in ks},
                    key=lambda x: (cfg["units"].index(x[0]), x[1]))
  for unit, k in settings:
    base = _ppl(cases, lr["metric"], unit, k, "none")
    if base is None:
      continue
    out += f"| {unit} | {k} | none | — | {base:.2f} | 0 % | 1 | — |\n"
    for kind in lr["kinds"]:
      names = [""] + [n for n, f in lr["fits"].items() if k in f["grid"].get(unit, [])]
      for name in names:
        c = cases.get(f"ppl/{lr['metric']}/{unit}/{k}/{kind}{'+' + name if name else ''}")
        if c is None:
          continue
        how = "closed form" if not name else (f"{c['recover_fit']} from {c['recover_init']}, {c['recover_steps']} "
                                              f"steps, lr {c['recover_lr']:g}")
        gap = (base - c["perplexity"]) / (base - dense) * 100
        out += (f"| {unit} | {k} | {kind} | {how} | {c['perplexity']:.2f} | {gap:+.0f} % | "
                f"{c.get('fit_error_mean', float('nan')):.3f} | {c.get('fit_seconds', 0):.0f} |\n")
  return out


def speed_table(result: dict) -> str:
  sp = result["cases"].get("speed")
  if not sp:
    return "(not run)\n"
  dense = sp["dense"]["tokens_per_second"]
  out = "| model | layers | params | perplexity | tokens/s | speed-up |\n|---|---|---|---|---|---|\n"
  for name, row in sp.items():
    if not isinstance(row, dict):
      continue
    out += (f"| {name} | {row['num_layers']} | {row['params'] / 1e6:.1f} M | {row['perplexity']:.2f} | "
            f"{row['tokens_per_second']:.0f} | {row['tokens_per_second'] / dense:.2f}x |\n")
  return out


def rankings(result: dict, first: int = 8) -> str:
  cfg, cases = result["config"], result["cases"]
  out = f"| unit | metric | first {first} removed (least important first) | Spearman vs cosine | mean stderr |\n" \
        "|---|---|---|---|---|\n"
  for unit in cfg["units"]:
    ref = cases.get(f"scores/cosine/{unit}")
    for metric in _metrics(cfg):
      s = cases.get(f"scores/{metric}/{unit}")
      if s is None:
        continue
      order = [r["layer"] for r in s["ranking"]]
      rho = "—"
      if ref is not None:
        a = {r["layer"]: i for i, r in enumerate(ref["ranking"])}
        b = {r["layer"]: i for i, r in enumerate(s["ranking"])}
        rho = f"{np.corrcoef([a[k] for k in a], [b[k] for k in a])[0, 1]:.2f}"
      se = [r["stderr"] for r in s["ranking"] if "stderr" in r]
      mean_se = f"{np.mean(se):.4f} (scores {min(r['score'] for r in s['ranking']):.3f}.." \
                f"{max(r['score'] for r in s['ranking']):.3f})" if se else "—"
      out += f"| {unit} | {metric} | {', '.join(map(str, order[:first]))} | {rho} | {mean_se} |\n"
  return out


def _curve(ax, xs, ys, top, style, label):
  """One line, with points above ``top`` drawn at ``top`` and labelled with their value."""
  line, = ax.plot(xs, np.minimum(ys, top), style, marker="o", ms=3, label=label)
  for x, y in zip(xs, ys):
    if y > top:
      ax.plot([x], [top], "^", color=line.get_color(), ms=7)
      ax.annotate(f"{y:.3g}", (x, top), textcoords="offset points", xytext=(-30, -12), fontsize=7,
                  color=line.get_color())


def plot(result: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cfg, cases = result["config"], result["cases"]
  dense = cases["dense"]["perplexity"]
  top = 2.5 * dense
  rc = cfg["recovery"]
  fig, axes = plt.subplots(1, len(cfg["units"]) + 1, figsize=(4.6 * (len(cfg["units"]) + 1), 4.2))
  styles = {"none": "-", **{r: s for r, s in zip(rc["kinds"], ("--", ":", "-."))}}
  rows = [(m, "none") for m in _metrics(cfg)] + [(rc["metric"], r) for r in rc["kinds"]]
  for ax, unit in zip(axes, cfg["units"]):
    for metric, recover in rows:
      ks = sorted(k for k in set(cfg["grid"][unit]) | set(rc["grid"][unit])
                  if _ppl(cases, metric, unit, k, recover) is not None)
      ys = [dense] + [_ppl(cases, metric, unit, k, recover) for k in ks]
      _curve(ax, [0] + ks, ys, top, styles[recover], metric if recover == "none" else f"{metric} + {recover}")
    ax.set_xlabel(f"{unit} units removed")
    ax.set_title(unit)
  ax = axes[-1]  # the same runs against the parameters they remove
  for unit, color in zip(cfg["units"], ("C0", "C1", "C2")):
    for metric, style in (("cosine", "-"), ("loss", "--")):
      ks = [k for k in cfg["grid"][unit] if f"ppl/{metric}/{unit}/{k}/none" in cases]
      gone = [0.0] + [(cases["speed"]["dense"]["params"] - cases[f"ppl/{metric}/{unit}/{k}/none"]["params"]) / 1e6
                      for k in ks]
      _curve(ax, gone, [dense] + [_ppl(cases, metric, unit, k, "none") for k in ks], top, color + style,
             f"{unit} by {metric}")
  ax.set_xlabel("parameters removed (M)")
  ax.set_title("by parameters removed")
  for ax in axes:
    ax.axhline(1.05 * dense, color="gray", lw=0.8, ls="--", label="dense + 5 %")
    ax.set_ylim(0.95 * dense, top * 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left")
  axes[0].set_ylabel("perplexity (austen)")
  dates = ", ".join(run["machine"]["date"] for run in result.get("runs", []))
  fig.suptitle(f"{cfg['model']}, one-shot depth pruning; {result['runs'][0]['machine']['note']}, {dates}",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def write_report(result: dict, out: Path) -> None:
  text = ("# Depth pruning results\n\n" + setup(result) + "\n## Metric wall-clock\n\n" + metric_times(result)
          + "\n## Perplexity\n" + perplexity_tables(result) + "\n## Attention sublayers removable within +5 %\n\n"
          + removable(result) + "\n## Recovery\n\n" + buy_back(result)
          + "\n## Closed-form against trained recovery\n\n" + learned_table(result) + "\n## Evaluation speed\n\n"
          + speed_table(result) + "\n## Rankings\n\n" + rankings(result))
  (out / "table.md").write_text(text)
  plot(result, out / "perplexity.png")
  print(f"wrote {out / 'table.md'} and {out / 'perplexity.png'}")


if __name__ == "__main__":
  path = Path(sys.argv[1])
  write_report(json.loads(path.read_text()), path.parent)
