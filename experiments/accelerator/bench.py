"""One prepared run on the device JAX finds -- an accelerator, else the CPU with smaller settings -- writing
``experiments/accelerator/result_<device>.json`` (``<device>``: ``jax.devices()[0].device_kind``, lower case,
other characters than letters and digits as ``_``). Called by ``run.sh``; phases in order, the JSON rewritten
after each, a phase that fails recorded with its error, and no phase started past ``--budget`` seconds:

1. ``eval``: perplexity-eval tokens/s of the embedded model (SmolLM2-135M), timed after one compiling batch.
2. ``embedded``: whole-pass seconds of ``jp.prune`` on the embedded model, compilation included, for
   magnitude, Wanda, SparseGPT and ADMM at 50 % unstructured, and of the same pass run again (compiled).
3. ``model_1b``: the same on a random model of LLaMA-3.2-1B's shapes (its first blocks), in bfloat16.
4. ``solvers``: ``experiments/solver_speed/bench.py`` at LLaMA-7B shapes, against a plain matmul, one process per
   shape (a shape not started past ``--budget``; the process stopped at ``--stop`` seconds).
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from experiments.common import command, machine, write_json  # noqa: E402
import jaxprune as jp  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = ["magnitude", "wanda", "sparsegpt", "admm"]
PHASES = ("eval", "embedded", "model_1b", "solvers")
# LLaMA-3.2-1B (without its rope scaling, which changes no cost).
LLAMA_1B = dict(family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                num_heads=32, num_kv_heads=8, head_dim=64, max_position_embeddings=131072, tie_word_embeddings=True,
                norm_eps=1e-5, rope_theta=500000.0)
SETTINGS = {
    "accelerator": {
        "eval": {"windows": 64, "seqlen": 512, "batch_size": 16},
        "embedded": {"blocks": None, "nsamples": 128, "seqlen": 512, "batch_size": 16, "methods": METHODS},
        "model_1b": {"blocks": 4, "nsamples": 64, "seqlen": 2048, "batch_size": 8, "dtype": "bfloat16",
                     "methods": METHODS},
        "solvers": {"shapes": "4096x4096,11008x4096", "tokens": 8192, "repeats": 2},
    },
    "cpu": {
        "note": "no accelerator found: smaller settings (the embedded model's first block of 30, one block of the "
                "1B model with magnitude and Wanda, the solvers at 2048x2048 instead of 7B shapes); seconds are not "
                "comparable with an accelerator's",
        "eval": {"windows": 2, "seqlen": 256, "batch_size": 2},
        "embedded": {"blocks": 1, "nsamples": 2, "seqlen": 128, "batch_size": 2, "methods": METHODS},
        "model_1b": {"blocks": 1, "nsamples": 1, "seqlen": 128, "batch_size": 1, "dtype": "bfloat16",
                     "methods": ["magnitude", "wanda"]},
        "solvers": {"shapes": "2048x2048", "tokens": 512, "repeats": 1},
    },
}


def device_name() -> str:
  return re.sub(r"[^a-z0-9]+", "_", jax.devices()[0].device_kind.lower()).strip("_")


def first_blocks(config, params, blocks: int | None):
  """The model cut to its first ``blocks`` blocks (all when None)."""
  if blocks is None or blocks >= config.num_layers:
    return config, params
  return config.replace(num_layers=blocks), {**params, "layers": params["layers"][:blocks]}


def eval_speed(s: dict, model) -> dict:
  evals = jp.load_windows("austen", tokenizer=model.tokenizer, seqlen=s["seqlen"], role="eval",
                          max_windows=s["windows"])
  mesh = jp.data_mesh()
  warm = jp.perplexity(model.params, evals.tokens[:s["batch_size"]], config=model.config,
                       batch_size=s["batch_size"], mesh=mesh, progress=False)
  timed = jp.perplexity(model.params, evals.tokens, config=model.config, batch_size=s["batch_size"], mesh=mesh,
                        progress=False)
  return {"tokens": timed.tokens, "seconds": round(timed.seconds, 3),
          "tokens_per_second": round(timed.tokens / timed.seconds, 1), "perplexity": timed.perplexity,
          "first_batch_seconds": round(warm.seconds, 3), "dtype": model.dtype}


def passes(s: dict, config, params, calib, deadline: float, out: dict, save) -> dict:
  """Whole-pass seconds of every method of ``s`` at 50 % unstructured, into ``out``: ``seconds`` of the first pass
  (compilation included) and ``warm_seconds`` of the same pass run again in the process (its programs compiled);
  ``save()`` after each (a run killed by its timeout keeps what it finished)."""
  for method in s["methods"]:
    if time.time() > deadline:
      out[method] = {"skipped": "time budget spent"}
      continue
    spec = jp.PruneSpec(method, jp.Unstructured(0.5))
    run = functools.partial(jp.prune, params, calib, config=config, spec=spec, batch_size=s["batch_size"],
                            mesh=jp.data_mesh(), progress=False)
    outcome = run()
    out[method] = {"seconds": round(outcome.seconds, 2), "sparsity": outcome.metadata["sparsity"]}
    save()
    out[method]["warm_seconds"] = round(run().seconds, 2)
    print(f"  {method}: {out[method]}", flush=True)
    save()
  return out


def embedded_passes(s: dict, model, deadline: float, phase: dict, save) -> dict:
  config, params = first_blocks(model.config, model.params, s["blocks"])
  calib = jp.load_windows("wiki", tokenizer=model.tokenizer, seqlen=s["seqlen"], role="calib",
                          nsamples=s["nsamples"], seed=0)
  phase.update(blocks=config.num_layers, of_blocks=model.config.num_layers, dtype=model.dtype,
               tokens=int(calib.tokens.size), methods={})
  passes(s, config, params, calib.tokens, deadline, phase["methods"], save)
  return phase


def passes_1b(s: dict, deadline: float, phase: dict, save) -> dict:
  from jaxprune.models import _model as M

  config = jp.ModelConfig(**{**LLAMA_1B, "num_layers": s["blocks"]})
  start = time.perf_counter()
  init = jax.jit(M.init_params, static_argnums=0, static_argnames="dtype")  # random weights, not a forward
  params = jax.tree.map(np.asarray, init(config, jax.random.key(0), dtype=jax.numpy.dtype(s["dtype"])))
  init_seconds = time.perf_counter() - start
  calib = np.random.default_rng(0).integers(0, config.vocab_size, (s["nsamples"], s["seqlen"])).astype(np.int32)
  phase.update(shapes="LLaMA-3.2-1B", blocks=s["blocks"], of_blocks=LLAMA_1B["num_layers"], dtype=s["dtype"],
               tokens=int(calib.size), init_seconds=round(init_seconds, 2), methods={})
  passes(s, config, params, calib, deadline, phase["methods"], save)
  return phase


def solver_speed(s: dict, deadline: float, stop: float, phase: dict, save) -> dict:
  """``experiments/solver_speed/bench.py`` once per shape of ``s``, each in a process of its own stopped at ``stop``
  (a time); a shape is not started after ``deadline``. Each shape's selections and solvers go into ``phase`` as
  they finish, then ``save()``."""
  phase["shapes"] = {}
  for shape in s["shapes"].split(","):
    if time.time() > deadline:
      phase["shapes"][shape] = {"skipped": "time budget spent"}
      continue
    with tempfile.TemporaryDirectory() as tmp:
      subprocess.run([sys.executable, str(REPO / "experiments" / "solver_speed" / "bench.py"), "--shapes", shape,
                      "--tokens", str(s["tokens"]), "--repeats", str(s["repeats"]), "--out", tmp], check=True,
                     timeout=max(1.0, stop - time.time()))
      result = json.loads((Path(tmp) / "result.json").read_text())
    phase["shapes"][shape] = {"matmul_4096_gflops": round(result["matmul_4096_gflops"], 1),
                              "selection": result["selection"][shape], "solvers": result["solvers"]}
    save()
  return phase


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--budget", type=float, default=420.0, help="no phase or method starts after this many seconds")
  p.add_argument("--stop", type=float, default=470.0,
                 help="the solver phase's processes are stopped after this many seconds (run.sh stops all at 480)")
  p.add_argument("--settings", choices=sorted(SETTINGS), help="default: accelerator unless the backend is cpu")
  p.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases to run, in their order [all]")
  p.add_argument("--out", type=Path, help="the JSON [result_<device>.json beside this script]")
  args = p.parse_args()
  start = time.time()
  deadline = start + args.budget
  kind = args.settings or ("cpu" if jax.default_backend() == "cpu" else "accelerator")
  settings = SETTINGS[kind]
  out = args.out or HERE / f"result_{device_name()}.json"
  phases = args.phases.split(",")
  if set(phases) - set(PHASES):
    p.error(f"--phases: unknown {', '.join(sorted(set(phases) - set(PHASES)))}; known: {', '.join(PHASES)}")
  result = {"command": command(Path(__file__)), "machine": machine(), "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
            "settings_kind": kind, "settings": settings, "phases": {}}
  model = None
  for phase in [phase for phase in PHASES if phase in phases]:
    if time.time() > deadline:
      result["phases"][phase] = {"skipped": "time budget spent"}
      continue
    print(f"== {phase}", flush=True)
    t0 = time.time()
    value = result["phases"][phase] = {"started_at_seconds": round(t0 - start, 1)}  # stays if the run is killed
    save = lambda: write_json(out, {**result, "total_seconds": round(time.time() - start, 1)})  # noqa: E731
    save()
    try:
      if phase in ("eval", "embedded") and model is None:
        model = jp.load_model("smollm2-135m")
      value.update({"eval": lambda: eval_speed(settings["eval"], model),
                    "embedded": lambda: embedded_passes(settings["embedded"], model, deadline, value, save),
                    "model_1b": lambda: passes_1b(settings["model_1b"], deadline, value, save),
                    "solvers": lambda: solver_speed(settings["solvers"], deadline, start + args.stop, value,
                                                    save)}[phase]())
    except Exception as err:  # noqa: BLE001 - one failing phase must not cost the others
      traceback.print_exc()
      value["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    value["phase_seconds"] = round(time.time() - t0, 1)
    result["phases"][phase] = value
    result["total_seconds"] = round(time.time() - start, 1)
    write_json(out, result)
  print(json.dumps(result["phases"], indent=1))


if __name__ == "__main__":
  main()
