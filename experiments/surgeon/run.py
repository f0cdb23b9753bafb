"""LLM Surgeon on the embedded SmolLM2-135M beside the quality table's methods, from one config.

  python experiments/surgeon/run.py                  # config.json -> result.json, table.md, per_layer_sparsity.png
  python experiments/surgeon/run.py --only-report    # table and plot from result.json

Groups, each in a fresh process (its own peak memory) that writes its cases into ``result.json`` as they finish,
so an interrupted run resumes where it stopped:

* ``one-shot``: a forward pass over the calibration windows and the curvature over the same windows, each timed
  after compiling on one window; then, from that one curvature and one set of costs (the dense model's: they do
  not depend on the target), the allocation, OBS updates and perplexity of every pattern of ``one_shot``.
* ``surgeon:PxT``: ``T`` shots to pattern ``P`` (curvature and costs again after every shot).
* ``METHOD:P``: another method at the same calibration (``baselines``), by ``jaxprune.prune``.
* ``one-shot-units``: structured units (whole MLP units and groups of heads) at every target of ``units`` from
  one curvature and one set of unit costs; the model is shrunk and evaluated.
* ``magnitude-units``: the same units and parameter targets ranked by the RMS of their weights, no update.
* ``depth:UNIT:K:RECOVERY``: depth pruning of ``K`` blocks (``depth``, ``units_depth``).
* ``surgeon-retrain:PxT``: ``T`` shots to ``P`` with ``units_retrain``'s subset trained after every shot on the next
  ``steps × batch_size`` windows of its text and merged before the next shot (``jaxprune prune --retrain``).

Patterns: ``uNN`` = NN % unstructured, ``N:M`` = N kept of every M, ``rcNN`` = NN % of the linears' weights by
rows and columns, ``unitsNN`` = NN % of the model's parameters (embeddings included) by whole units,
``unitsbK`` = by whole units, the parameters of ``K`` blocks (what depth pruning of ``K`` blocks removes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import REPO, machine, parse_case, peak_rss_gb  # noqa: E402

HERE = Path(__file__).resolve().parent


def _load(path: Path) -> dict:
  return json.loads(path.read_text()) if path.is_file() else {"runs": {}}


def _record(out: Path, cfg: dict, name: str, value: dict) -> None:
  """Adds case ``name`` to ``out`` (read, update, atomic rewrite), with the run's header."""
  from jaxprune.io._atomic import atomic_write
  from jaxprune.prune._job import versions

  doc = _load(out)
  doc["runs"][name] = value
  doc.update(config=cfg, machine=machine(), versions=versions(), command=os.environ.get("SURGEON_COMMAND", ""))
  atomic_write(out, json.dumps(doc, indent=1, sort_keys=True) + "\n")
  print(f"== {name}: {json.dumps(value)[:300]}", flush=True)


def _pattern(shape: str, params=None):
  """The pattern of ``shape``; ``unitsbK`` needs the model's ``params`` (its blocks' size)."""
  from jaxprune.prune._surgeon_pass import RowsColumns, Units, count_params

  if shape.startswith("rc"):
    return RowsColumns(int(shape[2:]) / 100)
  if shape.startswith("unitsb"):
    return Units(int(shape[6:]) * count_params(params["layers"][0]) / count_params(params))
  if shape.startswith("units"):
    return Units(int(shape[5:]) / 100)
  return parse_case(f"surgeon:{shape}")[1]


def _setup(cfg: dict):
  from jaxprune.data import load_windows
  from jaxprune.io._load import load_model

  model = load_model(cfg["model"])
  calib = load_windows(cfg["calib"], tokenizer=model.tokenizer, seqlen=cfg["seqlen"], role="calib",
                       nsamples=cfg["nsamples"], seed=cfg["seed"])
  evals = load_windows(cfg["eval"], tokenizer=model.tokenizer, seqlen=cfg["seqlen"], role="eval",
                       max_windows=cfg["eval_windows"])
  return model, calib, evals


def _evaluate(params, config, evals, cfg) -> dict:
  from jaxprune._evaluate import perplexity

  r = perplexity(params, evals.tokens, config=config, batch_size=cfg["batch_size"], progress=False)
  return {"perplexity": r.perplexity, "eval_tokens": r.tokens, "eval_seconds": round(r.seconds, 1),
          "eval_sha256": evals.sha256}


def one_shot(cfg: dict, out: Path, allocation: str = "global") -> None:
  """Timing of forward against curvature, then every one-shot pattern from one curvature and one set of costs
  (``allocation="layer"``: the patterns of ``one_shot_layer``, each linear pruned by the same fraction)."""
  import jax

  from jaxprune.prune import _surgeon_pass as P
  from jaxprune.runner import Runner

  prefix, patterns = ("surgeon", cfg["one_shot"]) if allocation == "global" else ("surgeon-layer",
                                                                                   cfg["one_shot_layer"])
  todo = [p for p in patterns if f"{prefix}:{p}" not in _load(out)["runs"]]
  if any(p.startswith("rc") for p in todo):
    raise SystemExit("one_shot shares element costs; give rows-and-columns patterns as multi_shot [P, 1]")
  if not todo and "timing" in _load(out)["runs"]:
    return
  model, calib, evals = _setup(cfg)
  runner = Runner(model.config, batch_size=cfg["batch_size"])
  tokens = calib.tokens
  jax.block_until_ready(runner.window_losses(model.params, tokens[:cfg["batch_size"]]))  # compile
  start = time.perf_counter()
  jax.block_until_ready(runner.window_losses(model.params, tokens))
  forward = time.perf_counter() - start
  key = jax.random.fold_in(jax.random.key(cfg["seed"]), 1)  # shot 1's key, as run_surgeon
  runner.curvature(model.params, tokens[:cfg["batch_size"]], key=key)  # compile
  start = time.perf_counter()
  curvature = runner.curvature(model.params, tokens, key=key)
  seconds = time.perf_counter() - start
  timing = "timing" if allocation == "global" else "timing-layer"
  _record(out, cfg, timing, {"calib_tokens": int(tokens.size), "forward_seconds": round(forward, 1),
                             "curvature_seconds": round(seconds, 1), "ratio": round(seconds / forward, 2),
                             "batch_size": cfg["batch_size"]})
  state = P.initial_state(model.params, model.config)
  spec0 = P.SurgeonSpec(_pattern(todo[0]) if todo else P.Unstructured(0.5), chunk=cfg["chunk"], seed=cfg["seed"])
  start = time.perf_counter()
  linears, costs, inverses = P.shot_costs(state, model.config, spec0, curvature, progress=False)
  costs_seconds = time.perf_counter() - start
  for shape in todo:
    spec = P.SurgeonSpec(_pattern(shape), chunk=cfg["chunk"], seed=cfg["seed"], allocation=allocation)
    start = time.perf_counter()
    allocation = P.allocate(model.config, spec, linears, costs, 1)
    layers, masks, reports = P.apply_allocation(state, spec, curvature, linears, allocation, inverses,
                                                progress=False)
    update = time.perf_counter() - start
    params = {**model.params, "layers": layers}
    pruned = sum(allocation.pruned)
    _record(out, cfg, f"{prefix}:{shape}", {
        "shots": 1, "sparsity": pruned / sum(m.size for m in allocation.masks),
        "curvature_seconds": round(seconds, 1), "costs_seconds": round(costs_seconds, 1),
        "allocate_and_update_seconds": round(update, 1),
        "prune_seconds": round(seconds + costs_seconds + update, 1),
        "per_layer_sparsity": [{p: float(1 - m.mean()) for p, m in block.items()} for block in masks],
        "peak_rss_gb": round(peak_rss_gb(), 2), **_evaluate(params, model.config, evals, cfg)})
    del params, layers, masks, reports


def _shrunk(params, config, evals, cfg) -> dict:
  """Shrinks a units-pruned model (:func:`~jaxprune.models._compact.compact`), counts and evaluates it."""
  from jaxprune.models._compact import compact
  from jaxprune.prune._surgeon_pass import count_params

  small, small_config, _ = compact(params, config)
  return {"params_before": count_params(params), "params_after": count_params(small),
          "layer_widths": [list(small_config.widths(i)) for i in range(small_config.num_layers)],
          **_evaluate(small, small_config, evals, cfg)}


def one_shot_units(cfg: dict, out: Path) -> None:
  """Structured units at every target of ``units`` from one curvature and one set of unit costs (the dense
  model's: they do not depend on the target)."""
  import jax

  from jaxprune.prune import _surgeon_pass as P
  from jaxprune.runner import Runner

  todo = [t for t in cfg["units"] if f"surgeon:units{t}" not in _load(out)["runs"]]
  if not todo:
    return
  model, calib, evals = _setup(cfg)
  runner = Runner(model.config, batch_size=cfg["batch_size"])
  start = time.perf_counter()
  curvature = runner.curvature(model.params, calib.tokens, key=jax.random.fold_in(jax.random.key(cfg["seed"]), 1))
  seconds = time.perf_counter() - start
  state = P.initial_state(model.params, model.config)
  spec0 = P.SurgeonSpec(_pattern(f"units{todo[0]}", model.params), chunk=cfg["chunk"], seed=cfg["seed"])
  start = time.perf_counter()
  linears, costs, inverses = P.shot_costs(state, model.config, spec0, curvature, progress=False)
  costs_seconds = time.perf_counter() - start
  total = P.count_params(model.params)
  for t in todo:
    spec = P.SurgeonSpec(_pattern(f"units{t}", model.params), chunk=cfg["chunk"], seed=cfg["seed"])
    start = time.perf_counter()
    allocation = P.allocate(model.config, spec, linears, costs, 1, total_params=total)
    layers, masks, _ = P.apply_allocation(state, spec, curvature, linears, allocation, inverses, progress=False)
    update = time.perf_counter() - start
    _record(out, cfg, f"surgeon:units{t}", {
        "shots": 1, "target": spec.pattern.sparsity, "removed": P.units_removed(costs, allocation),
        "curvature_seconds": round(seconds, 1), "costs_seconds": round(costs_seconds, 1),
        "allocate_and_update_seconds": round(update, 1), "prune_seconds": round(seconds + costs_seconds + update, 1),
        "per_layer_sparsity": [{p: float(1 - m.mean()) for p, m in block.items()} for block in masks],
        "peak_rss_gb": round(peak_rss_gb(), 2), **_shrunk({**model.params, "layers": layers}, model.config, evals,
                                                          cfg)})


def magnitude_units(cfg: dict, out: Path) -> None:
  """The units of every target of ``units`` with the smallest RMS weight, no update (a target that would empty a
  layer's heads or MLP is recorded with its error)."""
  from jaxprune.errors import JaxpruneError
  from jaxprune.prune._surgeon_units import magnitude_units as prune_units

  todo = [t for t in cfg["units"] if f"magnitude-units:units{t}" not in _load(out)["runs"]]
  if not todo:
    return
  model, _, evals = _setup(cfg)
  for t in todo:
    pattern = _pattern(f"units{t}", model.params)
    start = time.perf_counter()
    try:
      params, _, removed = prune_units(model.params, model.config, pattern)
    except JaxpruneError as err:
      _record(out, cfg, f"magnitude-units:units{t}", {"target": pattern.sparsity, "error": str(err)})
      continue
    seconds = time.perf_counter() - start
    _record(out, cfg, f"magnitude-units:units{t}", {
        "target": pattern.sparsity, "removed": removed, "prune_seconds": round(seconds, 1),
        "peak_rss_gb": round(peak_rss_gb(), 2), **_shrunk(params, model.config, evals, cfg)})


def multi_shot(cfg: dict, out: Path, case: str) -> None:
  from jaxprune.prune import _surgeon_pass as P

  _, shape, *options = case.split(":")
  shape, shots = shape.rsplit("x", 1)
  model, calib, evals = _setup(cfg)
  spec = P.SurgeonSpec(_pattern(shape, model.params), shots=int(shots), chunk=cfg["chunk"], seed=cfg["seed"],
                       fisher_labels=options[0] if options else "sampled",
                       allocation=options[1] if len(options) > 1 else "global")
  outcome = P.surgeon_prune(model.params, calib.tokens, config=model.config, spec=spec,
                            batch_size=cfg["batch_size"], progress=False)
  meta = outcome.metadata
  sizes = {k: meta[k] for k in ("params_before", "params_after", "params_kept", "layer_widths") if k in meta}
  _record(out, cfg, case, {"shots": int(shots), "sparsity": meta["sparsity"],
                           "prune_seconds": round(outcome.seconds, 1), "shots_report": meta["shots_report"],
                           "per_layer_sparsity": meta["per_layer_sparsity"], **sizes,
                           "peak_rss_gb": round(peak_rss_gb(), 2),
                           **_evaluate(outcome.params, outcome.config or model.config, evals, cfg)})


def retrained(cfg: dict, out: Path, case: str) -> None:
  """``surgeon-retrain:PxT``: ``T`` shots to ``P`` with retraining after every shot (``units_retrain``)."""
  from jaxprune.data import eval_windows, load_text, tokenize
  from jaxprune.prune import _surgeon_pass as P

  shape, shots = case.split(":")[1].rsplit("x", 1)
  r = cfg["units_retrain"]
  model, calib, evals = _setup(cfg)
  stream = tokenize(load_text(r["data"]), model.tokenizer)[r["data_start"]:]
  train = eval_windows(stream, r["seqlen"])
  retrain = P.Retraining(r["train"], steps=r["steps"], lr=r["lr"], batch_size=r["batch_size"], seed=cfg["seed"])
  spec = P.SurgeonSpec(_pattern(shape, model.params), shots=int(shots), chunk=cfg["chunk"], seed=cfg["seed"],
                       retrain=retrain)
  outcome = P.surgeon_prune(model.params, calib.tokens, config=model.config, spec=spec,
                            batch_size=cfg["batch_size"], progress=False, train_windows=train)
  meta = outcome.metadata
  _record(out, cfg, case, {"shots": int(shots), "retrain": meta["retrain"], "train_windows": list(train.shape),
                           "prune_seconds": round(outcome.seconds, 1), "shots_report": meta["shots_report"],
                           **{k: meta[k] for k in ("params_before", "params_after", "layer_widths")},
                           "peak_rss_gb": round(peak_rss_gb(), 2),
                           **_evaluate(outcome.params, outcome.config, evals, cfg)})


def baseline(cfg: dict, out: Path, case: str) -> None:
  from jaxprune.prune._job import prune
  from jaxprune.prune._sequential import PruneSpec

  model, calib, evals = _setup(cfg)
  method, pattern = parse_case(case)
  outcome = prune(model.params, calib.tokens, config=model.config, spec=PruneSpec(method, pattern),
                  batch_size=cfg["batch_size"], progress=False)
  _record(out, cfg, case, {"sparsity": outcome.metadata["sparsity"], "prune_seconds": round(outcome.seconds, 1),
                           "peak_rss_gb": round(peak_rss_gb(), 2),
                           **_evaluate(outcome.params, model.config, evals, cfg)})


def depth(cfg: dict, out: Path, case: str) -> None:
  """``depth:UNIT:K:RECOVERY``: depth pruning of ``K`` units ranked by cosine (the structured comparison)."""
  from jaxprune.depth import Recovery, depth_prune
  from jaxprune.prune._surgeon_pass import count_params

  _, unit, k, recovery = case.split(":")
  model, calib, evals = _setup(cfg)
  kind, _, rank = recovery.partition("-")
  start = time.perf_counter()
  res = depth_prune(model.params, calib.tokens, config=model.config, metric="cosine", unit=unit, remove=int(k),
                    recovery=Recovery(kind, int(rank or 0)), batch_size=cfg["batch_size"])
  seconds = time.perf_counter() - start
  _record(out, cfg, case, {"removed": list(res.removed), "params_before": count_params(model.params),
                           "params_after": count_params(res.params), "prune_seconds": round(seconds, 1),
                           "peak_rss_gb": round(peak_rss_gb(), 2), **_evaluate(res.params, res.config, evals, cfg)})


def groups(cfg: dict) -> list[str]:
  return (["one-shot"] + list(cfg["baselines"][:2]) + [multi_case(m) for m in cfg["multi_shot"][:1]]
          + ["one-shot-layer"] + list(cfg["baselines"][2:]) + [multi_case(m) for m in cfg["multi_shot"][1:2]]
          + list(cfg.get("depth", [])) + [multi_case(m) for m in cfg["multi_shot"][2:]]
          + (["one-shot-units", "magnitude-units"] + list(cfg["units_depth"][:2])
             + [multi_case(m) for m in cfg["units_multi"][:1]] + list(cfg["units_depth"][2:])
             + [multi_case(m) for m in cfg["units_multi"][1:]] if cfg.get("units") else [])
          + list(cfg.get("units_depth_recovery", []))
          + [f"surgeon-retrain:{p}x{t}" for p, t in cfg.get("units_retrain", {}).get("cases", [])])


def multi_case(entry: list) -> str:
  """``[pattern, shots]``, ``[pattern, shots, labels]`` or ``[pattern, shots, labels, allocation]`` ->
  ``surgeon:PxT``, ``surgeon:PxT:labels`` or ``surgeon:PxT:labels:allocation``."""
  return f"surgeon:{entry[0]}x{entry[1]}" + "".join(f":{e}" for e in entry[2:])


def done(cfg: dict, runs: dict, group: str) -> bool:
  if group == "one-shot":
    return "timing" in runs and all(f"surgeon:{p}" in runs for p in cfg["one_shot"])
  if group == "one-shot-layer":
    return all(f"surgeon-layer:{p}" in runs for p in cfg["one_shot_layer"])
  if group in ("one-shot-units", "magnitude-units"):
    prefix = "surgeon" if group == "one-shot-units" else "magnitude-units"
    return all(f"{prefix}:units{t}" in runs for t in cfg["units"])
  return group in runs


def table(cfg: dict, runs: dict) -> str:
  """Perplexity per method and pattern: this folder's runs, then the quality table's (64 calibration windows)."""
  quality = json.loads((REPO / "experiments/quality/result.json").read_text())["runs"]
  cols = cfg["table_patterns"]
  head = "| method | calibration | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols) + "\n"
  rows = []
  n = cfg["nsamples"]
  multi = sorted({(e[1], tuple(e[2:])) for e in cfg["multi_shot"]})
  for label, fmt in [("surgeon, 1 shot", "surgeon:{}"),
                     ("surgeon, 1 shot, per-layer allocation", "surgeon-layer:{}"),
                     *[(f"surgeon, {t} shot{'s' if t > 1 else ''}" + (f", {opts[0]} labels" if opts else "")
                        + (f", {opts[1]} allocation" if len(opts) > 1 else ""),
                        "surgeon:{}x" + str(t) + "".join(f":{o}" for o in opts)) for t, opts in multi],
                     *[(m, m + ":{}") for m in sorted({b.split(":")[0] for b in cfg["baselines"]})]]:
    cells = [f"{runs[c]['perplexity']:.2f}" if (c := fmt.format(p)) in runs else "—" for p in cols]
    if any(c != "—" for c in cells):
      rows.append(f"| {label} | {n} × {cfg['seqlen']} | " + " | ".join(cells) + " |")
  for method in ("magnitude", "wanda", "sparsegpt", "admm"):
    cells = [f"{quality[c]['perplexity']:.2f}" if (c := f"{method}:{p}") in quality else "—" for p in cols]
    rows.append(f"| {method} (quality table) | 64 × 512 | " + " | ".join(cells) + " |")
  dense = quality["dense"]["perplexity"]
  extra = ""
  for name in ("timing", "timing-layer"):
    if name in runs:
      t = runs[name]
      extra += (f"\nCurvature over {t['calib_tokens']} calibration tokens ({name}): {t['curvature_seconds']} s "
                f"against {t['forward_seconds']} s for a forward pass over the same tokens ({t['ratio']}×), batch "
                f"{t['batch_size']}, compiled first.\n")
  structured = [c for c in sorted(runs) if "params_after" in runs[c]]
  if structured:
    extra += ("\n| structured case | parameters before | after | removed | perplexity |\n|---|---|---|---|---|\n"
              + "\n".join(f"| {c} | {runs[c]['params_before']} | {runs[c]['params_after']} | "
                          f"{1 - runs[c]['params_after'] / runs[c]['params_before']:.1%} | "
                          f"{runs[c]['perplexity']:.2f} |" for c in structured) + "\n")
  extra += units_table(cfg, runs)
  seconds = [f"| {c} | {r['prune_seconds']} | {r['peak_rss_gb']} |" for c, r in sorted(runs.items())
             if "prune_seconds" in r]
  return (head + "\n".join(rows) + f"\n\nDense: {dense:.2f}. Perplexity on {cfg['eval_windows']} × {cfg['seqlen']} "
          f"tokens of {cfg['eval']}.\n" + extra + "\n| case | prune seconds | peak RSS GB |\n|---|---|---|\n"
          + "\n".join(seconds) + "\n")


def units_table(cfg: dict, runs: dict) -> str:
  """Structured units per target of the model's parameters, and depth pruning at the nearest block counts (without
  and with recovery): each cell the perplexity and the share of the model's parameters actually removed."""
  if not cfg.get("units"):
    return ""

  def cell(case: str) -> str:
    if case not in runs:
      return "—"
    r = runs[case]
    if "error" in r:
      return "refused: " + r["error"].split(";")[0].replace("structured units ", "")
    return f"{r['perplexity']:.2f} ({1 - r['params_after'] / r['params_before']:.1%})"

  def table(corner: str, labels: list[str], rows: list[tuple[str, list[str]]]) -> str:
    return (f"| {corner} | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n"
            + "\n".join(f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows) + "\n")

  variants = sorted({(e[1], tuple(e[2:])) for e in cfg["units_multi"]})
  r = cfg.get("units_retrain")
  retrain_shots = sorted({t for _, t in r["cases"]}) if r else []
  cases = ([("surgeon, 1 shot", "surgeon:units{}")]
           + [(f"surgeon, {n} shot{'s' if n > 1 else ''}" + (f", {opts[0]} labels" if opts else ""),
               "surgeon:units{}x" + str(n) + "".join(f":{o}" for o in opts)) for n, opts in variants]
           + [(f"surgeon, {n} shots, {r['train']} after each", "surgeon-retrain:units{}x" + str(n))
              for n in retrain_shots]
           + [("magnitude units (RMS), no update", "magnitude-units:units{}")])
  units = table("units target (of the model's parameters)", [label for label, _ in cases],
                [(f"{t} %" if isinstance(t, int) else f"{t[1:]} blocks' parameters",
                  [cell(fmt.format(t)) for _, fmt in cases]) for t in cfg["units"]])
  blocks = sorted({int(c.split(":")[2]) for c in runs if c.startswith("depth:block:")})
  recoveries = ["none"] + sorted({c.split(":")[3] for c in runs if c.startswith("depth:block:")} - {"none"})
  depth = table("depth pruning (cosine)", ["no recovery" if k == "none" else f"{k} recovery" for k in recoveries],
                [(f"{k} blocks", [cell(f"depth:block:{k}:{rec}") for rec in recoveries]) for k in blocks])
  return "\n" + units + "\n" + depth + retrain_note(cfg, runs)


def retrain_note(cfg: dict, runs: dict) -> str:
  """Per retrained case: the training loss on each shot's windows before and after, and the seconds."""
  cases = [c for c in sorted(runs) if c.startswith("surgeon-retrain:")]
  if not cases:
    return ""
  r = cfg["units_retrain"]
  lines = [f"\nRetraining after each shot: {r['train']}, {r['steps']} AdamW steps of {r['batch_size']} × "
           f"{r['seqlen']} tokens of {r['data']} (lr {r['lr']:g}), the next {r['steps'] * r['batch_size']} windows "
           "each shot.\n",
           "| case | training loss before → after, per shot | retraining seconds per shot | prune seconds |",
           "|---|---|---|---|"]
  for c in cases:
    shots = [s["retrain"] for s in runs[c]["shots_report"]]
    lines.append(f"| {c} | " + ", ".join(f"{s['loss_before']:.3f} → {s['loss_after']:.3f}" for s in shots)
                 + " | " + ", ".join(f"{s['seconds']:.0f}" for s in shots) + f" | {runs[c]['prune_seconds']} |")
  return "\n".join(lines) + "\n"


def plot(runs: dict, path: Path) -> None:
  try:
    import matplotlib
  except ImportError:
    print(f"matplotlib not installed: {path.name} not redrawn", file=sys.stderr)
    return

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cases = [c for c in ("surgeon:u50", "surgeon:u70", "surgeon:u50x3") if c in runs]
  if not cases:
    return
  fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 3.8), squeeze=False)
  for ax, case in zip(axes[0], cases):
    per_layer = runs[case]["per_layer_sparsity"]
    for name in per_layer[0]:
      ax.plot(range(len(per_layer)), [block[name] for block in per_layer], marker=".", label=name.split("/")[-1])
    ax.set(xlabel="block", ylabel="fraction pruned", title=f"{case} (ppl {runs[case]['perplexity']:.1f})",
           ylim=(0, 1))
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", type=Path, default=HERE / "config.json")
  p.add_argument("--out", type=Path, default=HERE)
  p.add_argument("--only-report", action="store_true", help="rewrite table and plot from result.json")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--group", help=argparse.SUPPRESS)
  args = p.parse_args()
  cfg = json.loads(args.config.read_text())
  out = args.out / "result.json"
  if args.worker:
    if args.group == "one-shot-units":
      return one_shot_units(cfg, out)
    if args.group == "magnitude-units":
      return magnitude_units(cfg, out)
    if args.group in ("one-shot", "one-shot-layer"):
      return one_shot(cfg, out, "global" if args.group == "one-shot" else "layer")
    if args.group.startswith("surgeon:"):
      return multi_shot(cfg, out, args.group)
    if args.group.startswith("surgeon-retrain:"):
      return retrained(cfg, out, args.group)
    if args.group.startswith("depth:"):
      return depth(cfg, out, args.group)
    return baseline(cfg, out, args.group)
  if not args.only_report:
    import subprocess

    command = f"python {Path(__file__).resolve().relative_to(REPO)} " + " ".join(sys.argv[1:])
    env = {**os.environ, **cfg.get("env", {}), "SURGEON_COMMAND": command}
    for group in groups(cfg):
      if done(cfg, _load(out)["runs"], group):
        continue
      print(f"== group {group}", flush=True)
      done_run = subprocess.run([sys.executable, __file__, "--worker", f"--group={group}", "--config",
                                 str(args.config), "--out", str(args.out)], env=env)
      if done_run.returncode:
        print(f"== group {group} failed (exit {done_run.returncode}); going on", flush=True)
  runs = _load(out)["runs"]
  (args.out / "table.md").write_text(table(cfg, runs))
  plot(runs, args.out / "per_layer_sparsity.png")
  print(table(cfg, runs))


if __name__ == "__main__":
  main()
