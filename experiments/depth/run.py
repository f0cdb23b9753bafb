"""Depth pruning of the embedded model: perplexity against removed units, per metric, unit kind and recovery.

  python experiments/depth/run.py --config experiments/depth/config.json --out experiments/depth

One process, in this order: dense perplexity; every metric on every unit kind (timed, after one warm-up pass
so that the times exclude compilation); for each metric x unit x k the one-shot removal of the k least
important units and its perplexity; the same with bias and low-rank recovery for the ranking of
``recovery.metric``; the evaluation speed of the dense, a block-pruned and an attention-pruned model, each
warmed up and timed on the same windows, side by side; then the sections ``extra_metrics`` (more rankings and
their removals) and ``learned_recovery`` (closed-form against trained adapters, ``"<kind>+<fit>"``).

``result.json`` is rewritten after every case, and a re-run resumes: a case is recomputed only when the config
it depends on changed, i.e. the base config (every key but the sections) or, for a case of a section, that
section. ``result["runs"]`` records each process (date, machine, load, the cases it computed); ``table.md`` and
``perplexity.png`` are written at the end (see ``report.py``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import command, machine, peak_rss_gb, write_json  # noqa: E402

SECTIONS = ("extra_metrics", "learned_recovery")  # config keys whose cases resume independently of the rest
ADAPTIVE = ("loss", "shapley", "shapley_near")  # metrics that see only the first ``adaptive_windows`` windows


def _digest(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class Context:
  """The loaded model, data windows and the result store of one run."""

  def __init__(self, cfg: dict, out: Path):
    from jaxprune import data_mesh, load_model, load_windows

    self.cfg, self.out = cfg, out
    self.model = load_model(cfg["model"])
    tok, vocab = self.model.tokenizer, self.model.config.vocab_size
    c, e = cfg["calib"], cfg["eval"]
    self.calib = load_windows(c["data"], tokenizer=tok, seqlen=c["seqlen"], role="calib", nsamples=c["nsamples"],
                              seed=c["seed"], vocab_size=vocab)
    self.evals = load_windows(e["data"], tokenizer=tok, seqlen=e["seqlen"], role="eval", max_windows=e["windows"],
                              vocab_size=vocab)
    self.mesh = data_mesh()
    self.digest = _digest({k: v for k, v in cfg.items() if k not in SECTIONS})
    sections = {k: _digest(cfg.get(k)) for k in SECTIONS}
    path = out / "result.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    self.result = old if old.get("config_sha256") == self.digest else {}
    cases = self.result.get("cases", {})
    stale = {k for k, d in sections.items() if self.result.get("section_sha256", {}).get(k) != d}
    cases = {key: c for key, c in cases.items() if c.get("section") not in stale}
    self.result.update(config=cfg, config_sha256=self.digest, section_sha256=sections, cases=cases)
    self.computed: list[str] = []

  def tokens_for(self, metric: str):
    """Calibration windows of ``metric``: adaptive metrics use the first ``adaptive_windows`` of them."""
    if metric in ADAPTIVE:
      return self.calib.tokens[:self.cfg["adaptive_windows"]]
    return self.calib.tokens

  def save(self) -> None:
    if self.result.get("runs"):
      self.result["runs"][-1]["peak_rss_gb"] = round(peak_rss_gb(), 2)
    write_json(self.out / "result.json", self.result)

  def case(self, key: str, compute, section: str | None = None) -> dict:
    """``result["cases"][key]``, computed (and saved) unless a previous run of this config has it; ``section``:
    the config section the case belongs to (None: the base config)."""
    if key not in self.result["cases"]:
      start = time.perf_counter()
      value = compute()
      value["wall_seconds"] = round(time.perf_counter() - start, 2)
      if section is not None:
        value["section"] = section
      self.result["cases"][key] = value
      self.computed.append(key)
      self.save()
      print(f"{key}: {json.dumps(value)[:160]}", flush=True)
    return self.result["cases"][key]

  def perplexity(self, params, config, *, warm: bool = False) -> dict:
    from jaxprune import perplexity

    bs = self.cfg["batch_size"]
    if warm:  # compile on one batch first, so that the timed pass measures steady-state tokens/s
      perplexity(params, self.evals.tokens[:bs], config=config, batch_size=bs, mesh=self.mesh, progress=False)
    ev = perplexity(params, self.evals.tokens, config=config, batch_size=bs, mesh=self.mesh, progress=False)
    return ev.to_json()


def scores(ctx: Context, metric: str, unit: str, section: str | None = None) -> dict:
  from jaxprune.depth import score

  def compute():
    s = score(ctx.model.params, ctx.tokens_for(metric), config=ctx.model.config, metric=metric, unit=unit,
              samples=ctx.cfg["shapley_samples"], seed=ctx.cfg["calib"]["seed"], batch_size=ctx.cfg["batch_size"],
              mesh=ctx.mesh)
    toks = ctx.tokens_for(metric)
    return {**s.to_json(), "calib_windows": int(toks.shape[0]), "calib_tokens": int(toks.size)}

  return ctx.case(f"scores/{metric}/{unit}", compute, section)


def recovery_of(ctx: Context, recover: str):
  """``(Recovery, fit batch size)`` of ``"none"``, ``"bias"``, ``"lowrank:R"`` (closed form) or ``"<kind>+<fit>"``
  (trained as ``learned_recovery.fits[fit]`` says)."""
  from jaxprune.depth import parse_recovery

  kind, _, name = recover.partition("+")
  options = {"width": ctx.model.config.hidden_size, "damp": ctx.cfg["recovery"]["damp"]}
  if not name:
    return parse_recovery(kind, **options), ctx.cfg["batch_size"]
  f = ctx.cfg["learned_recovery"]["fits"][name]
  rec = parse_recovery(kind, **options, fit=f["fit"], init=f["init"], steps=f["steps"], lr=f["lr"])
  return rec, f["batch_size"]


def pruned(ctx: Context, unit: str, layers: list[int], recover: str):
  """Params and config of the model without ``unit`` s ``layers``, with ``recover`` fitted on calibration data."""
  from jaxprune.depth import fit_adapters, replace_units

  m = ctx.model
  rec, batch_size = recovery_of(ctx, recover)
  start = time.perf_counter()
  adapters, errors = fit_adapters(m.params, m.config, ctx.calib.tokens, unit=unit, layers=layers, recovery=rec,
                                  batch_size=batch_size, mesh=ctx.mesh, seed=ctx.cfg["calib"]["seed"])
  params, config = replace_units(m.params, m.config, unit=unit, adapters=adapters, recovery=rec)
  fit = {"fit_seconds": round(time.perf_counter() - start, 2), **rec.to_json()} if rec.kind != "none" else {}
  if errors:
    fit["fit_error_mean"] = round(sum(errors.values()) / len(errors), 5)
  return params, config, fit


def removal_case(ctx: Context, metric: str, unit: str, k: int, recover: str, section: str | None = None) -> dict:
  from jaxprune.depth import param_count

  def compute():
    order = [row["layer"] for row in ctx.result["cases"][f"scores/{metric}/{unit}"]["ranking"]]
    same = [key for key, c in ctx.result["cases"].items() if key.startswith("ppl/") and c["unit"] == unit
            and c["recover"] == recover and sorted(c["removed"]) == sorted(order[:k]) and "same_as" not in c]
    if same:  # another ranking removed the same units: the same model, evaluated once
      return {**ctx.result["cases"][same[0]], "metric": metric, "removed": order[:k], "same_as": same[0]}
    params, config, fit = pruned(ctx, unit, order[:k], recover)
    return {"metric": metric, "unit": unit, "k": k, "recover": recover, "removed": order[:k],
            "params": param_count(params), "num_layers": config.num_layers, **fit,
            **ctx.perplexity(params, config)}

  return ctx.case(f"ppl/{metric}/{unit}/{k}/{recover}", compute, section)


def speed(ctx: Context) -> dict:
  """Dense, block-pruned and attention-pruned models timed on the same windows, one after the other."""
  from jaxprune.depth import param_count

  sp = ctx.cfg["speed"]

  def compute():
    rows = {"dense": (ctx.model.params, ctx.model.config)}
    for unit in ("block", "attention"):
      order = [r["layer"] for r in ctx.result["cases"][f"scores/{sp['metric']}/{unit}"]["ranking"]]
      params, config, _ = pruned(ctx, unit, order[:sp[unit]], "none")
      rows[f"{unit} -{sp[unit]}"] = (params, config)
    out = {}
    for name, (params, config) in rows.items():
      out[name] = {"params": param_count(params), "num_layers": config.num_layers,
                   **ctx.perplexity(params, config, warm=True)}
    return out

  return ctx.case("speed", compute)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", type=Path, default=Path(__file__).with_name("config.json"))
  ap.add_argument("--out", type=Path, default=Path(__file__).parent)
  args = ap.parse_args(argv)
  cfg = json.loads(args.config.read_text())
  t0 = time.perf_counter()
  ctx = Context(cfg, args.out)
  runs = ctx.result.setdefault("runs", [])
  run = {"command": command(Path(__file__)), "machine": {**machine(), "note": cfg.get("machine_note", "")},
         "load_average_start": [round(x, 2) for x in os.getloadavg()]}
  runs.append(run)
  ctx.result["num_layers"] = ctx.model.config.num_layers
  ctx.result["data"] = {
      "calib": {**cfg["calib"], "tokens": int(ctx.calib.tokens.size), "sha256": ctx.calib.sha256},
      "adaptive_calib_tokens": int(ctx.tokens_for("loss").size),
      "eval": {**cfg["eval"], "tokens": int(ctx.evals.tokens.size), "sha256": ctx.evals.sha256}}
  ctx.case("dense", lambda: ctx.perplexity(ctx.model.params, ctx.model.config))
  ctx.case("warmup", lambda: _warmup(ctx))
  for unit in cfg["units"]:
    for metric in cfg["metrics"]:
      scores(ctx, metric, unit)
  for unit in cfg["units"]:
    for metric in cfg["metrics"]:
      for k in cfg["grid"][unit]:
        removal_case(ctx, metric, unit, k, "none")
  rc = cfg["recovery"]
  for unit in cfg["units"]:
    for recover in rc["kinds"]:
      for k in rc["grid"][unit]:
        removal_case(ctx, rc["metric"], unit, k, recover)
  speed(ctx)
  extra_metrics(ctx)
  learned_recovery(ctx)
  run["cases"] = ctx.computed
  run["seconds"] = round(time.perf_counter() - t0, 1)  # this process (a resumed run: its part)
  run["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
  ctx.save()
  from experiments.depth.report import write_report

  write_report(ctx.result, args.out)


def extra_metrics(ctx: Context) -> None:
  """Rankings by ``extra_metrics`` (timed after this process's own warm-up) and their removals."""
  cfg = ctx.cfg
  extra = cfg.get("extra_metrics", [])
  pending = [(m, u) for u in cfg["units"] for m in extra if f"scores/{m}/{u}" not in ctx.result["cases"]]
  if pending and "warmup" not in ctx.computed:
    ctx.result["runs"][-1]["warmup_seconds"] = _warmup(ctx)["seconds"]
  for unit in cfg["units"]:
    for metric in extra:
      scores(ctx, metric, unit, section="extra_metrics")
  for unit in cfg["units"]:
    for metric in extra:
      for k in cfg["grid"][unit]:
        removal_case(ctx, metric, unit, k, "none", section="extra_metrics")


def learned_recovery(ctx: Context) -> None:
  """Per fit of ``learned_recovery.fits`` and (unit, k) of its grid: closed-form and trained recovery of each kind,
  on the ranking of ``learned_recovery.metric``."""
  lr = ctx.cfg.get("learned_recovery")
  if not lr:
    return
  for name, f in lr["fits"].items():
    for unit, ks in f["grid"].items():
      for k in ks:
        removal_case(ctx, lr["metric"], unit, k, "none", section="learned_recovery")
        for kind in lr["kinds"]:
          removal_case(ctx, lr["metric"], unit, k, kind, section="learned_recovery")
          removal_case(ctx, lr["metric"], unit, k, f"{kind}+{name}", section="learned_recovery")


def _warmup(ctx: Context) -> dict:
  """Compiles the stage, similarity and loss functions at the batch shapes the metrics use, so that the
  metric times that follow are steady-state."""
  from jaxprune.depth import leave_one_out, similarities

  start = time.perf_counter()
  m, bs = ctx.model, ctx.cfg["batch_size"]
  similarities(m.params, ctx.calib.tokens[:bs], config=m.config, batch_size=bs, mesh=ctx.mesh)
  leave_one_out(m.params, ctx.tokens_for("loss"), config=m.config, unit="block", layers=(m.config.num_layers - 1,),
                batch_size=bs, mesh=ctx.mesh)
  return {"seconds": round(time.perf_counter() - start, 2)}


if __name__ == "__main__":
  main()
