"""Retraining after pruning on the embedded model: masked fine-tuning and PERP's subsets, at one token budget.

  python experiments/retrain/run.py                  # every case of config.json; resumes from result.json
  python experiments/retrain/run.py --only-report    # table.md and plot.png from result.json

Every case runs in a fresh process (its own peak memory), in this order: the dense perplexity; each pruned
checkpoint (kept under ``runs/retrain-experiment/``) and its perplexity; each retraining method on each checkpoint;
layer-wise reconstruction (the pruning pass again, each block fitted to the dense block's outputs); then the
train-step throughput of jaxprune against a PyTorch loop with ``torch.optim.AdamW`` on the dense model, full
fine-tuning and ``biases,norms``, one after the other. Compilations are shared between the processes through JAX's
persistent compilation cache. Memory: the peak resident memory during training above the memory before it (the
kernel's high-water mark, reset right before the first step), in units of the model's parameter bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import REPO, add_worker_args, machine, run_worker, write_json  # noqa: E402

RUNS = REPO / "runs" / "retrain-experiment"  # checkpoints and token windows of a run (not in git), per config
WORK = RUNS


# ---------------------------------------------------------------------------------------------- memory, timing

def _rss_bytes(field: str = "VmRSS") -> int:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024
  return 0


def _reset_peak() -> int:
  """Resets the kernel's peak-RSS mark (``VmHWM``) of this process; returns the current RSS."""
  Path("/proc/self/clear_refs").write_text("5")
  return _rss_bytes()


class StepTimer:
  """Wall time of every step (the first one compiles); ``tokens_per_second`` over the steps after it."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step, self.times = tokens_per_step, [time.perf_counter()]

  def __call__(self, *_):
    self.times.append(time.perf_counter())

  def steady(self) -> float:
    gaps = [b - a for a, b in zip(self.times[1:], self.times[2:])]
    return self.tokens_per_step * len(gaps) / sum(gaps) if gaps else float("nan")


# ------------------------------------------------------------------------------------------------------- cases

def _data(name: str):
  import numpy as np

  return np.load(WORK / "data" / f"{name}.npy")


def _ppl(params, config) -> dict:
  import jaxprune as jp

  r = jp.perplexity(params, _data("eval"), config=config, batch_size=4, progress=False)
  return {"perplexity": r.perplexity, "eval_tokens": r.tokens, "eval_seconds": round(r.seconds, 1)}


def case_dense(cfg):
  """Tokenizes once: evaluation, calibration and training windows to ``WORK/data``, the model to ``WORK/dense``
  (later cases load a checkpoint, not the GGUF file); the dense perplexity."""
  import numpy as np

  import jaxprune as jp
  from jaxprune.data import eval_windows, load_text, tokenize, tokens_sha256

  model = jp.load_model(cfg["model"])
  e, c, t = cfg["eval"], cfg["calib"], cfg["train"]
  data = {
      "eval": jp.load_windows(e["data"], tokenizer=model.tokenizer, seqlen=e["seqlen"], role="eval",
                              max_windows=e["windows"]).tokens,
      "calib": jp.load_windows(c["data"], tokenizer=model.tokenizer, seqlen=c["seqlen"], role="calib",
                               nsamples=c["nsamples"], seed=c["seed"]).tokens,
      # Non-overlapping windows of the training text: the same cut as jaxprune retrain.
      "train": eval_windows(tokenize(load_text(t["data"]), model.tokenizer)[t.get("data_start", 0):], t["seqlen"]),
  }
  (WORK / "data").mkdir(parents=True, exist_ok=True)
  for name, windows in data.items():
    np.save(WORK / "data" / f"{name}.npy", windows)
  jp.save_checkpoint(WORK / "dense", model.config, model.params, overwrite=True)
  return {**_ppl(model.params, model.config), **{f"{k}_sha256": tokens_sha256(v) for k, v in data.items()},
          **{f"{k}_windows": list(v.shape) for k, v in data.items()}}


def case_prune(cfg, name, reconstruct: bool = False):
  import jaxprune as jp
  from jaxprune.retrain import parse_reconstruction, with_biases
  from experiments.common import parse_case

  model = jp.load_checkpoint(WORK / "dense")
  method, pattern = parse_case(cfg["checkpoints"][name])
  calib = _data("calib")
  params, config, recon = model.params, model.config, None
  if reconstruct:
    r = cfg["reconstruct"]
    recon = parse_reconstruction(r["train"], steps=r["steps"], lr=r["lr"], batch_size=r["batch_size"],
                                 warmup=r["warmup"])
    if "biases" in recon.spec.subsets:
      params, config = with_biases(params, config)
  start = _reset_peak()
  outcome = jp.prune(params, calib, config=config, spec=jp.PruneSpec(method, pattern), progress=False,
                     reconstruct=recon)
  peak = _rss_bytes("VmHWM") - start
  out = {"seconds": round(outcome.seconds, 1), "sparsity": outcome.metadata["sparsity"],
         "calib_tokens": int(calib.size), "peak_extra_bytes": peak, **_ppl(outcome.params, config)}
  if reconstruct:
    errors = [(r["reconstruct_error_before"], r["reconstruct_error_after"]) for r in outcome.metadata["layers"]]
    out.update(reconstruct=recon.to_json(), reconstruct_error_before=sum(e[0] for e in errors) / len(errors),
               reconstruct_error_after=sum(e[1] for e in errors) / len(errors),
               trainable_fraction=_reconstruct_fraction(params, recon.spec))
  else:
    WORK.mkdir(parents=True, exist_ok=True)
    jp.save_outcome(outcome, WORK / name, config, overwrite=True)
  return out


def _reconstruct_fraction(params, spec) -> float:
  """Parameters fitted per block (subset and adapters of every block), over the model's."""
  from jaxprune.retrain import count, lora_init, trainable_mask

  blocks = {"layers": params["layers"]}
  adapters = lora_init(blocks, spec, key=__import__("jax").random.key(0)) if spec.adapter else None
  n, _, _ = count(blocks, trainable_mask(blocks, spec, strict=False), adapters=adapters)
  total = sum(x.size for x in __import__("jax").tree.leaves(params))
  return n / total


def case_train(cfg, name):
  """Every retraining method on checkpoint ``name``, one after the other in this process (each measured from its
  own start: the peak-memory mark is reset before it)."""
  import gc

  import jax
  import jaxprune as jp
  from jaxprune.retrain import apply, linear_sparsity

  ck = jp.load_checkpoint(WORK / name, with_masks=True)
  t = cfg["train"]
  windows = _data("train")
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(ck.params))
  out = {}
  for method in cfg["methods"]:
    gc.collect()
    lr = t["lr"].get(method.split(":")[0], t["lr"]["default"])
    unmerged = method.startswith("lora:")
    timer = StepTimer(t["batch_size"] * t["seqlen"])
    start = _reset_peak()
    r = jp.retrain(ck.params, ck.config, ck.masks, method, windows, steps=t["steps"], batch_size=t["batch_size"],
                   lr=lr, warmup=t["warmup"], seed=t["seed"], merge_adapters=not unmerged, progress=False,
                   on_step=timer)
    peak = _rss_bytes("VmHWM") - start
    params = apply(r.params, r.adapters, r.masks, r.spec) if unmerged else r.params
    out[method] = {"lr": lr, "trainable_params": r.trainable_params, "trainable_fraction": r.trainable_fraction,
                   "tokens": r.tokens, "train_seconds": round(r.seconds, 1),
                   "steady_tokens_per_second": round(timer.steady(), 1), "losses": [float(x) for x in r.losses],
                   "sparsity": r.sparsity, "effective_sparsity": linear_sparsity(params), "peak_extra_bytes": peak,
                   "peak_extra_in_param_bytes": round(peak / param_bytes, 3), **_ppl(params, r.config)}
    print(f"{name} {method}: {json.dumps(out[method])}", file=sys.stderr, flush=True)
    del r, params
  return {"methods": out}


def case_speed(cfg, framework, spec):
  import jax
  import numpy as np
  import jaxprune as jp
  from jaxprune.retrain import with_biases

  s = cfg["speed"]
  model = jp.load_checkpoint(WORK / "dense")
  windows = np.ascontiguousarray(_data("train")[:s["steps"] * s["batch_size"], :s["seqlen"]])
  params, config = model.params, model.config
  if "biases" in spec:
    params, config = with_biases(params, config)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  tokens = s["batch_size"] * s["seqlen"]
  if framework == "jax":  # a first run compiles; the second is timed and measured
    jp.retrain(params, config, None, spec, windows, steps=1, batch_size=s["batch_size"], lr=5e-4, progress=False)
    timer = StepTimer(tokens)
    start = _reset_peak()
    jp.retrain(params, config, None, spec, windows, steps=s["steps"], batch_size=s["batch_size"], lr=5e-4,
               progress=False, on_step=timer)
    tps = timer.steady()
  else:
    tps, start = _torch_steps(params, config, spec, windows, s)
  peak = _rss_bytes("VmHWM") - start
  return {"framework": framework, "spec": spec, "tokens_per_second": round(tps, 1), "steps": s["steps"],
          "batch_size": s["batch_size"], "seqlen": s["seqlen"], "peak_extra_bytes": peak,
          "peak_extra_in_param_bytes": round(peak / param_bytes, 3), "param_bytes": param_bytes}


def _torch_steps(params, config, spec, windows, s):
  """A PyTorch loop on the same model (written with jaxprune's exporter, read by transformers): AdamW
  (``torch.optim.AdamW``, lr 5e-4), global-norm clipping at 1, on the leaves of ``spec``."""
  import tempfile

  import torch
  import transformers

  import jaxprune as jp

  torch.set_num_threads(s["threads"])
  with tempfile.TemporaryDirectory() as tmp:
    jp.save_hf_dir(Path(tmp) / "m", config, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", dtype=torch.float32)
  model.train()
  for name, p in model.named_parameters():
    p.requires_grad_(spec == "all" or name.endswith(".bias") or "norm" in name)
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=5e-4, weight_decay=0.0)
  timer = StepTimer(s["batch_size"] * s["seqlen"])
  start = _reset_peak()
  timer.times = [time.perf_counter()]
  for i in range(s["steps"]):
    ids = torch.tensor(windows[i * s["batch_size"]:(i + 1) * s["batch_size"]], dtype=torch.long)
    loss = model(ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    float(loss)
    timer()
  return timer.steady(), start


CASES = {"dense": case_dense, "prune": case_prune, "reconstruct": lambda c, n: case_prune(c, n, reconstruct=True),
         "train": case_train, "speed": case_speed}


def _work(cfg: dict) -> Path:
  import hashlib

  return RUNS / hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def worker(args) -> None:
  global WORK
  cfg = json.loads(args.config.read_text())
  WORK = _work(cfg)
  kind, *rest = args.case.split("/")
  print(json.dumps(CASES[kind](cfg, *rest)))


def cases(cfg: dict) -> list[str]:
  out = ["dense"] + [f"prune/{name}" for name in cfg["checkpoints"]]
  out += [f"train/{name}" for name in cfg["checkpoints"]]
  out += [f"reconstruct/{name}" for name in cfg["reconstruct"]["checkpoints"]]
  out += [f"speed/{fw}/{spec}" for spec in cfg["speed"]["specs"] for fw in ("jax", "torch")]
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", type=Path, default=Path(__file__).with_name("config.json"))
  p.add_argument("--out", type=Path, default=Path(__file__).parent)
  p.add_argument("--only-report", action="store_true")
  p.add_argument("--cases", nargs="*", help="run only these cases (default: all of the config)")
  add_worker_args(p)
  args = p.parse_args()
  if args.worker:
    return worker(args)
  cfg = json.loads(args.config.read_text())
  path = args.out / "result.json"
  result = json.loads(path.read_text()) if path.is_file() else {}
  if result.get("config") != cfg:
    result = {}
  if not args.only_report:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(RUNS / "jax-cache"))
    result.update(command="python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(REPO)),
                                                  *sys.argv[1:]]),
                  config=cfg, machine={**machine(), "note": cfg.get("machine_note", "")}, versions=_versions())
    runs = result.setdefault("runs", {})
    result.setdefault("load_average_start", [round(x, 2) for x in os.getloadavg()])
    for case in args.cases or cases(cfg):
      if case in runs:
        continue
      print(f"== {case}", flush=True)
      start = time.perf_counter()
      runs[case] = {**run_worker(Path(__file__), "--config", str(args.config), "--case", case),
                    "wall_seconds": round(time.perf_counter() - start, 1)}
      print(json.dumps(runs[case]), flush=True)
      result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
      write_json(path, result)
  from experiments.retrain.report import write_report

  write_report(result, args.out)


def _versions() -> dict:
  from jaxprune.prune._job import versions

  out = versions()
  try:
    import torch

    out["torch"] = torch.__version__
  except ImportError:
    pass
  return out


if __name__ == "__main__":
  main()
