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


def setup(result: dict) -> str:
  d, m = result["data"], result["machine"]
  c, e = d["calib"], d["eval"]
  return (f"Model `{result['config']['model']}`; calibration `{c['data']}` {c['nsamples']} windows x {c['seqlen']} "
          f"tokens = {c['tokens']} tokens (seed {c['seed']}; loss and Shapley use the first "
          f"{result['config']['adaptive_windows']} windows = {d['adaptive_calib_tokens']} tokens); evaluation "
          f"`{e['data']}` {e['windows']} windows x {e['seqlen']} = {e['tokens']} tokens. Machine: {m['note']} "
          f"({m['cpu']}, {m['cores']} cores), {m['date']}; this run took {result.get('total_seconds', 0) / 60:.1f} "
          f"min, peak RSS {result.get('peak_rss_gb', 0):.1f} GB. Dense perplexity "
          f"{result['cases']['dense']['perplexity']:.3f}.\n")


def metric_times(result: dict) -> str:
  cfg, cases = result["config"], result["cases"]
  out = "| metric | " + " | ".join(cfg["units"]) + " | calibration tokens |\n|---|" + "---|" * (
      len(cfg["units"]) + 1) + "\n"
  for metric in cfg["metrics"]:
    cells = []
    for unit in cfg["units"]:
      s = cases.get(f"scores/{metric}/{unit}")
      cells.append("—" if s is None else f"{s['seconds']:.1f} s")
    s = cases.get(f"scores/{metric}/{cfg['units'][0]}", {})
    extra = f" ({cfg['shapley_samples']} permutations)" if metric == "shapley" else ""
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
    rows = [(m, "none") for m in cfg["metrics"]] + [(rc["metric"], r) for r in rc["kinds"]]
    for metric, recover in rows:
      cells = [_cell(_ppl(cases, metric, unit, k, recover), dense) for k in ks]
      out += f"| {metric} | {recover} | " + " | ".join(cells) + " |\n"
  return out


def removable(result: dict, unit: str = "attention") -> str:
  """Largest k of the grid whose perplexity stays within +5 % of dense, per ranking and recovery."""
  cfg, cases = result["config"], result["cases"]
  dense = cases["dense"]["perplexity"]
  rc = cfg["recovery"]
  rows = [(m, "none") for m in cfg["metrics"]] + [(rc["metric"], r) for r in rc["kinds"]]
  out = f"| ranking | recovery | largest k tried (of {result.get('num_layers', '?')}) with perplexity <= 1.05 x " \
        f"dense | perplexity there |\n|---|---|---|---|\n"
  for metric, recover in rows:
    ks = sorted(k for k in set(cfg["grid"][unit]) | set(rc["grid"][unit])
                if _ppl(cases, metric, unit, k, recover) is not None)
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
    for metric in cfg["metrics"]:
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
  rows = [(m, "none") for m in cfg["metrics"]] + [(rc["metric"], r) for r in rc["kinds"]]
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
  m = result["machine"]
  fig.suptitle(f"{cfg['model']}, one-shot depth pruning; {m['note']}, {m['date']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def write_report(result: dict, out: Path) -> None:
  text = ("# Depth pruning results\n\n" + setup(result) + "\n## Metric wall-clock\n\n" + metric_times(result)
          + "\n## Perplexity\n" + perplexity_tables(result) + "\n## Attention sublayers removable within +5 %\n\n"
          + removable(result) + "\n## Recovery\n\n" + buy_back(result) + "\n## Evaluation speed\n\n"
          + speed_table(result) + "\n## Rankings\n\n" + rankings(result))
  (out / "table.md").write_text(text)
  plot(result, out / "perplexity.png")
  print(f"wrote {out / 'table.md'} and {out / 'perplexity.png'}")


if __name__ == "__main__":
  path = Path(sys.argv[1])
  write_report(json.loads(path.read_text()), path.parent)
