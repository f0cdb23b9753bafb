"""Depth pruning of the embedded model: perplexity against removed units, per metric, unit kind and recovery.

  python experiments/depth/run.py --config experiments/depth/config.json --out experiments/depth

One process, in this order: dense perplexity; every metric on every unit kind (timed, after one warm-up pass
so that the times exclude compilation); for each metric x unit x k the one-shot removal of the k least
important units and its perplexity; the same with bias and low-rank recovery for the ranking of
``recovery.metric``; finally the evaluation speed of the dense, a block-pruned and an attention-pruned model,
each warmed up and timed on the same windows, side by side. ``result.json`` is rewritten after every case (a
re-run with the same config resumes); ``table.md`` and ``perplexity.png`` are written at the end
(see ``report.py``).
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
    self.digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    path = out / "result.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    self.result = old if old.get("config_sha256") == self.digest else {}
    self.result.update(config=cfg, config_sha256=self.digest, cases=self.result.get("cases", {}))

  def tokens_for(self, metric: str):
    """Calibration windows of ``metric``: adaptive metrics use the first ``adaptive_windows`` of them."""
    if metric in ("loss", "shapley"):
      return self.calib.tokens[:self.cfg["adaptive_windows"]]
    return self.calib.tokens

  def save(self) -> None:
    self.result["peak_rss_gb"] = round(peak_rss_gb(), 2)
    write_json(self.out / "result.json", self.result)

  def case(self, key: str, compute) -> dict:
    """``result["cases"][key]``, computed (and saved) unless a previous run of this config has it."""
    if key not in self.result["cases"]:
      start = time.perf_counter()
      value = compute()
      value["wall_seconds"] = round(time.perf_counter() - start, 2)
      self.result["cases"][key] = value
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


def scores(ctx: Context, metric: str, unit: str) -> dict:
  from jaxprune.depth import score

  def compute():
    s = score(ctx.model.params, ctx.tokens_for(metric), config=ctx.model.config, metric=metric, unit=unit,
              samples=ctx.cfg["shapley_samples"], seed=ctx.cfg["calib"]["seed"], batch_size=ctx.cfg["batch_size"],
              mesh=ctx.mesh)
    toks = ctx.tokens_for(metric)
    return {**s.to_json(), "calib_windows": int(toks.shape[0]), "calib_tokens": int(toks.size)}

  return ctx.case(f"scores/{metric}/{unit}", compute)


def pruned(ctx: Context, unit: str, layers: list[int], recover: str):
  """Params and config of the model without ``unit`` s ``layers``, with ``recover`` fitted on calibration data."""
  from jaxprune.depth import fit_adapters, parse_recovery, replace_units

  m = ctx.model
  rec = parse_recovery(recover, width=m.config.hidden_size, damp=ctx.cfg["recovery"]["damp"])
  start = time.perf_counter()
  adapters, errors = fit_adapters(m.params, m.config, ctx.calib.tokens, unit=unit, layers=layers, recovery=rec,
                                  batch_size=ctx.cfg["batch_size"], mesh=ctx.mesh)
  params, config = replace_units(m.params, m.config, unit=unit, adapters=adapters, recovery=rec)
  fit = {"fit_seconds": round(time.perf_counter() - start, 2)} if rec.kind != "none" else {}
  if errors:
    fit["fit_error_mean"] = round(sum(errors.values()) / len(errors), 5)
  return params, config, fit


def removal_case(ctx: Context, metric: str, unit: str, k: int, recover: str) -> dict:
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

  return ctx.case(f"ppl/{metric}/{unit}/{k}/{recover}", compute)


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
  ctx.result["command"] = command(Path(__file__))
  ctx.result["num_layers"] = ctx.model.config.num_layers
  ctx.result["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
  ctx.result["machine"] = {**machine(), "note": cfg.get("machine_note", "")}
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
  ctx.result["total_seconds"] = round(time.perf_counter() - t0, 1)  # this process (a resumed run: its part)
  ctx.result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
  ctx.save()
  from experiments.depth.report import write_report

  write_report(ctx.result, args.out)


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
