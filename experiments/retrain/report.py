"""``table.md`` and ``plot.png`` of the retraining experiment, from its ``result.json``."""
from __future__ import annotations

from pathlib import Path

LABELS = {"all": "all (masked FT)", "biases,norms": "biases,norms", "masklora:16": "MaskLoRA 16",
          "scalelora:16": "ScaleLoRA 16", "lora:16": "LoRA 16 (unmerged)", "reconstruct": "layer-wise recon."}


def _cell(run: dict | None) -> str:
  return f"{run['perplexity']:.2f}" if run else "—"


def _train(runs: dict, name: str, method: str) -> dict | None:
  return runs.get(f"train/{name}", {}).get("methods", {}).get(method)


def table(result: dict) -> str:
  cfg, runs = result["config"], result.get("runs", {})
  methods = cfg["methods"]
  t, r = cfg["train"], cfg["reconstruct"]
  per_run = t["steps"] * t["batch_size"] * t["seqlen"]
  lines = [f"Perplexity on {cfg['eval']['data']} ({cfg['eval']['windows']} x {cfg['eval']['seqlen']} tokens); "
           f"dense {_cell(runs.get('dense'))}. Retraining: {per_run} tokens of {t['data']} per run "
           f"({t['steps']} steps x {t['batch_size']} x {t['seqlen']}); reconstruction: {r['train']}, {r['steps']} "
           f"AdamW steps per block on the calibration windows.", "",
           "| checkpoint | pruned | " + " | ".join(LABELS[m] for m in methods) + f" | {LABELS['reconstruct']} |",
           "|---|---|" + "---|" * (len(methods) + 1)]
  for name in cfg["checkpoints"]:
    cells = [_cell(runs.get(f"prune/{name}"))] + [_cell(_train(runs, name, m)) for m in methods]
    cells.append(_cell(runs.get(f"reconstruct/{name}")))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", "| method | trainable fraction | train seconds (mean) | steady tokens/s | peak extra memory "
                "(x parameter bytes) |", "|---|---|---|---|---|"]
  for m in methods:
    rows = [row for name in cfg["checkpoints"] if (row := _train(runs, name, m))]
    if rows:
      mean = lambda key: sum(x[key] for x in rows) / len(rows)  # noqa: E731
      lines.append(f"| {LABELS[m]} | {rows[0]['trainable_fraction']:.3g} | {mean('train_seconds'):.0f} | "
                   f"{mean('steady_tokens_per_second'):.0f} | {mean('peak_extra_in_param_bytes'):.2f} |")
  rec = [runs[k] for k in runs if k.startswith("reconstruct/")]
  if rec:
    lines.append(f"| {LABELS['reconstruct']} ({r['train']}) | {rec[0]['trainable_fraction']:.3g} per model | "
                 f"{sum(x['seconds'] for x in rec) / len(rec):.0f} (whole pass) | — | "
                 f"{sum(x['peak_extra_bytes'] for x in rec) / len(rec) / _param_bytes(runs):.2f} |")
  speed = {k.split("/", 1)[1]: v for k, v in runs.items() if k.startswith("speed/")}
  if speed:
    s = cfg["speed"]
    lines += ["", f"Train-step throughput on the dense model, batch {s['batch_size']} x {s['seqlen']} tokens, "
                  f"mean over steps 2-{s['steps']} (the first excluded), and peak memory above the loaded model:", "",
              "| subset | jaxprune tokens/s | PyTorch tokens/s | ratio | jaxprune memory | PyTorch memory |",
              "|---|---|---|---|---|---|"]
    for spec in s["specs"]:
      j, p = speed.get(f"jax/{spec}"), speed.get(f"torch/{spec}")
      if j and p:
        lines.append(f"| {spec} | {j['tokens_per_second']:.0f} | {p['tokens_per_second']:.0f} | "
                     f"{j['tokens_per_second'] / p['tokens_per_second']:.2f} | {j['peak_extra_in_param_bytes']:.2f} "
                     f"x | {p['peak_extra_in_param_bytes']:.2f} x |")
  return "\n".join(lines) + "\n"


def _param_bytes(runs: dict) -> float:
  for v in runs.values():
    if "param_bytes" in v:
      return v["param_bytes"]
  return 134515008 * 4  # SmolLM2-135M in float32


def plot(result: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cfg, runs = result["config"], result.get("runs", {})
  fig, ax = plt.subplots(figsize=(7.5, 4.6))
  markers = dict(zip(list(cfg["methods"]) + ["reconstruct"], "os^vDP*"))
  for color, name in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], cfg["checkpoints"]):
    pruned = runs.get(f"prune/{name}")
    if pruned:
      ax.axhline(pruned["perplexity"], color=color, lw=0.8, ls=":")
    for m in list(cfg["methods"]) + ["reconstruct"]:
      run = _train(runs, name, m) if m != "reconstruct" else runs.get(f"reconstruct/{name}")
      if run:
        ax.scatter(run["trainable_fraction"], run["perplexity"], color=color, marker=markers[m],
                   label=f"{name}" if m == cfg["methods"][0] else None)
  for m in list(cfg["methods"]) + ["reconstruct"]:
    ax.scatter([], [], color="gray", marker=markers[m], label=LABELS[m])
  if "dense" in runs:
    ax.axhline(runs["dense"]["perplexity"], color="black", lw=1, label="dense")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("trainable fraction of the parameters")
  ax.set_ylabel(f"perplexity ({cfg['eval']['data']})")
  ax.set_title("Retraining after pruning (dotted: before retraining)")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write_report(result: dict, out: Path) -> None:
  (out / "table.md").write_text(table(result))
  print(f"wrote {out / 'table.md'}")
  if result.get("runs"):
    plot(result, out / "plot.png")
    print(f"wrote {out / 'plot.png'}")
