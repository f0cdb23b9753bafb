"""The pruning pass against its physical limit: seconds of the whole pass divided by the seconds its FLOPs take at
the plain float32 matmul rate measured in the same process.

  python experiments/prune_speed/roofline.py          # -> roofline.json beside this script
  python experiments/prune_speed/roofline.py --warm   # each case also run again right after it, compiled already,
                                                      # then once more with every step timed

One process: the ``jnp.matmul`` rate (float32, ``HIGHEST``; 2048³ and the model's own shapes, best of a few after a
warm-up), one block's forward against its matrix products alone (:func:`block_anatomy`), then Wanda 50 % and
SparseGPT 50 % on SmolLM2-135M-Instruct and the parity calibration tokens (64 × 512), in the default order and
true-sequential, each from cleared compilation caches (compilation is included, as in ``run.py``) between two
measurements of the 2048³ rate (their mean is the case's rate; with ``--warm``, each case then again in the same
process, as a second pass of a session runs), then the matmul rates again. These passes run as a user's do,
without timers inside; with ``--warm`` a third pass of each case times every step with a timer that waits for its
result (which stops the host's work from overlapping the devices', so that pass is slower): where the seconds go.
FLOPs are counted from the config (:func:`pass_flops`): matrix products only; norms, softmax, rotary embeddings,
SiLU, the embedding gather and Wanda's selection count 0.
"""
from __future__ import annotations

import argparse
import collections
import functools
import inspect
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import REFERENCE, REPO, command, machine, parse_case, write_json  # noqa: E402

CASES = ("wanda:u50", "sparsegpt:u50")
ORDERS = ("default", "true_sequential")
COMPILE_SECONDS: collections.Counter = collections.Counter()  # JAX's compilation events of the current case
GEMM, GEMM_KEY = (2048, 2048, 2048), "2048x2048x2048"  # the plain product whose rate is the limit
STEPS = ("embed", "taps", "statistics", "solver", "reports", "outputs")


def _default(fn, name: str):
  return inspect.signature(fn).parameters[name].default


def _attention_chunk() -> int:
  from jaxprune.models._layers import dot_attention
  return _default(dot_attention, "chunk")


def _sparsegpt_blocksize() -> int:
  from jaxprune.prune.solvers._sparsegpt import sparsegpt
  return _default(sparsegpt, "blocksize")


def attention_flops(config, seq: int, *, chunk: int) -> float:
  """Products of the attention of one window of ``seq`` positions as :func:`dot_attention` computes them: query
  chunk ``[lo, hi)`` against keys ``[0, hi)`` (scores, then values), ``2·head_dim`` per pair, per query head."""
  pairs = sum(min(chunk, seq - lo) * min(lo + chunk, seq) for lo in range(0, seq, chunk))
  return 2 * 2 * config.head_dim * pairs * config.num_heads


def linear_shapes(config) -> dict[str, list[tuple[int, int]]]:
  """Input tap -> ``(d_out, d_in)`` of the linears reading it (a LLaMA block)."""
  d, f = config.hidden_size, config.intermediate_size
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  return {"attn_in": [(q, d), (kv, d), (kv, d)], "o_in": [(d, q)], "mlp_in": [(f, d), (f, d)], "down_in": [(d, f)]}


def gram_fraction(d: int) -> float:
  """The fraction of a full ``xᵀx`` product that :func:`jaxprune.prune._stats._gram` computes for width ``d``."""
  from jaxprune.prune import _stats
  parts = min(_stats._GRAM_PARTS, d // _stats._GRAM_MIN_BLOCK)
  return 1.0 if parts <= 1 else parts * (parts + 1) / 2 / parts**2


def pass_flops(config, *, windows: int, seq: int, method: str, true_sequential: bool, computed: bool = False,
               chunk: int | None = None, blocksize: int | None = None) -> dict[str, float]:
  """FLOPs of one pruning pass over ``windows`` × ``seq`` calibration tokens, per step of the pass.

  ``taps``: the forwards capturing the linears' inputs (default order: the dense block without its down projection;
  true-sequential: every linear but the down projection, group by group, and the attention); ``outputs``: the
  forwards producing the next block's inputs (default: the whole pruned block; true-sequential: the down
  projection); ``statistics``: per distinct input of width ``d``, ``2·T·d`` for the squared norms and, for a method
  with a Gram, ``2·T·d²``; ``solver``: SparseGPT's inverse Cholesky factor, ``2/3·d³`` per distinct input (a
  Cholesky factorisation and a triangular inverse, ``d³/3`` each), and its OBS update ``2·d_out·d_in²`` per linear;
  Wanda's selection 0. ``computed=True`` counts what the code does instead: the Gram's upper block triangle
  (:func:`gram_fraction`), the factor per linear (``4/3·d³``: the triangular inverse as a solve on the identity,
  ``d³``), the update on
  columns padded to ``blocksize`` with its in-block rank-1 steps, and the reports' dense output energy
  ``tr(W G Wᵀ)`` (``2·d_out·d_in²``; the solver's error comes from its column errors, no product). A LLaMA-family
  block with full sublayers; the LM head is not used.
  """
  if config.family != "llama" or config.sublayers or config.layer_widths:
    raise ValueError("pass_flops counts uniform LLaMA-family blocks with full sublayers")
  chunk = _attention_chunk() if chunk is None else chunk
  blocksize = _sparsegpt_blocksize() if blocksize is None else blocksize
  tokens = windows * seq
  shapes = linear_shapes(config)
  per_token = {tap: sum(2 * o * i for o, i in s) for tap, s in shapes.items()}
  attention = windows * attention_flops(config, seq, chunk=chunk)
  without_down = tokens * sum(v for tap, v in per_token.items() if tap != "down_in") + attention
  down = tokens * per_token["down_in"]
  outputs = down if true_sequential else without_down + down
  with_gram = method in ("sparsegpt", "admm")
  widths = [s[0][1] for s in shapes.values()]
  stats = sum(2 * tokens * d + (2 * tokens * d * d * (gram_fraction(d) if computed else 1) if with_gram else 0)
              for d in widths)
  solver = 0.0
  if method == "sparsegpt":
    for s in shapes.values():
      d = s[0][1]
      solver += len(s) * 4 / 3 * d**3 if computed else 2 / 3 * d**3
      for d_out, d_in in s:
        pad = -(-d_in // blocksize) * blocksize
        solver += 2 * d_out * pad * (pad + blocksize) + 2 * d_out * d_in**2 if computed else 2 * d_out * d_in**2
  elif method != "wanda":
    raise ValueError(f"pass_flops counts wanda and sparsegpt, not {method}")
  steps = {"taps": without_down, "outputs": outputs, "statistics": stats, "solver": solver}
  steps = {k: float(v * config.num_layers) for k, v in steps.items()}
  return {**steps, "total": sum(steps.values())}


def matmul_rates(shapes, *, repeats: int = 5, min_seconds: float = 0.2) -> dict[str, float]:
  """GFLOP/s of ``jnp.matmul`` (float32, ``HIGHEST``, jitted) per ``(m, k, n)``: the best of ``repeats`` timings,
  each of enough calls to last ``min_seconds``, after a warm-up."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  product = jax.jit(functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST))
  rates = {}
  for m, k, n in shapes:
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k), np.float32))
    b = jnp.asarray(rng.standard_normal((k, n), np.float32))
    start = time.perf_counter()
    product(a, b).block_until_ready()
    calls = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      out = [product(a, b) for _ in range(calls)]
      jax.block_until_ready(out)
      best = min(best, (time.perf_counter() - start) / calls)
    rates[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
  return rates


def model_shapes(config, seq: int) -> list[tuple[int, int, int]]:
  """The pass's largest products, ``(m, k, n)``: a window through gate and down, a batch's Gram of the MLP input
  and of the down input (8 windows)."""
  d, f = config.hidden_size, config.intermediate_size
  return [(seq, d, f), (seq, f, d), (d, 8 * seq, d), (f, 8 * seq, f)]


def block_anatomy(model, seq: int, *, repeats: int = 7) -> dict:
  """Seconds of one batch (8 windows of ``seq``) through block 0 as the pass runs it (window by window), against
  the same matrix products alone, window by window: the linears, then the linears and the attention's score and
  value products (query chunks against the keys before them, as :func:`dot_attention`). Interleaved, best of
  ``repeats``, beside the 2048³ rate: what the products cost, and what the rest of a block (norms, rotary
  embeddings, softmax, SiLU, masks, copies) adds."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxprune.models import linear_groups
  from jaxprune.prune._sequential import kernel_at
  from jaxprune.runner import Runner

  config, chunk = model.config, _attention_chunk()
  runner = Runner(config, batch_size=8)
  block = runner.place(model.params["layers"][0])
  w = {path.split("/")[1][:-5]: kernel_at(block, path) for paths in linear_groups(config).values() for path in paths}
  h = jnp.asarray(np.random.default_rng(0).standard_normal((8, seq, config.hidden_size), np.float32) * 0.1)
  kv, hd, groups = config.num_kv_heads, config.head_dim, config.num_heads // config.num_kv_heads

  def products(x, attention: bool):
    mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    q, k, v = mm(x, w["q"]), mm(x, w["k"]), mm(x, w["v"])
    a = q
    if attention:
      qh = q.reshape(seq, kv, groups, hd).transpose(1, 0, 2, 3)
      kh, vh = k.reshape(seq, kv, hd).transpose(1, 2, 0), v.reshape(seq, kv, hd).transpose(1, 0, 2)
      outs = [mm(mm(qh[:, lo:lo + chunk].reshape(kv, -1, hd), kh[..., :lo + chunk]), vh[:, :lo + chunk])
              for lo in range(0, seq, chunk)]
      a = jnp.concatenate(outs, axis=1).reshape(kv, seq, groups, hd).transpose(1, 0, 2, 3).reshape(seq, -1)
    y = x + mm(a, w["o"])
    return y + mm(mm(y, w["gate"]) + mm(y, w["up"]), w["down"])

  runs = {"block": lambda: runner.block(block, h),
          **{name: functools.partial(jax.jit(lambda x, a: jax.lax.map(lambda xi: products(xi, a), x),
                                             static_argnums=1), h, attention)
             for name, attention in (("linears", False), ("linears_and_attention", True))}}
  best = {name: float("inf") for name in (*runs, "gemm")}
  for name, fn in runs.items():
    jax.block_until_ready(fn())
  for _ in range(repeats):
    for name, fn in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      best[name] = min(best[name], time.perf_counter() - start)
    best["gemm"] = min(best["gemm"], 2 * GEMM[0] ** 3 / matmul_rates([GEMM], repeats=1)[GEMM_KEY] / 1e9)
  rate = 2 * GEMM[0] ** 3 / best.pop("gemm")
  per_token = {tap: sum(2 * o * i for o, i in s) for tap, s in linear_shapes(config).items()}
  linears = 8 * seq * sum(per_token.values())
  flops = {"linears": linears, "linears_and_attention": linears + 8 * attention_flops(config, seq, chunk=chunk)}
  flops["block"] = flops["linears_and_attention"]
  return {"windows": 8, "seq": seq, "matmul_gflop_per_s": rate / 1e9, "repeats": repeats, "load": os.getloadavg(),
          **{name: {"seconds": sec, "gflop": flops[name] / 1e9, "gflop_per_s": flops[name] / sec / 1e9,
                    "ratio": sec / (flops[name] / rate)} for name, sec in best.items()}}


def _timed_steps(seconds: collections.Counter, key=None):
  """Wraps the pass's steps in timers that wait for their results (undone by the returned function); each call's
  seconds go to ``seconds[key(step, keyword arguments)]`` (default: the step's name)."""
  import jax

  from jaxprune.prune import _sequential as seq
  from jaxprune.runner import Runner

  def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
      start = time.perf_counter()
      out = jax.block_until_ready(fn(*a, **k))
      seconds[key(name, k) if key else name] += time.perf_counter() - start
      return out
    return wrapper

  patches = [(Runner, "embed", "embed"), (Runner, "taps", "taps"), (Runner, "tap_sums", "taps"),
             (Runner, "block", "outputs"),
             (seq, "_accumulate", "statistics"), (seq, "_solve", "solver"), (seq, "_prune_group", "prune_group")]
  saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
  for owner, attr, name in patches:
    setattr(owner, attr, timed(name, getattr(owner, attr)))
  return lambda: [setattr(owner, attr, fn) for owner, attr, fn in saved]


def one_case(model, calib, case: str, order: str, *, warm: bool = False, timed: bool = False) -> dict:
  """The whole pass of ``case`` in ``order`` from cleared compilation caches (``warm``: right after the same pass,
  every program compiled already), between two measurements of the 2048³ matmul rate (whose mean is the case's
  rate): seconds in all, compilation, load; with ``timed``, also per step (timers that wait for each step's
  result)."""
  import jax

  import jaxprune as jp
  from jaxprune.prune import _sequential

  if not warm:
    jax.clear_caches()
    _sequential._jitted_solver.cache_clear()
  method, pattern = parse_case(case)
  seconds = collections.Counter()
  COMPILE_SECONDS.clear()
  load = os.getloadavg()
  rates = [matmul_rates([GEMM])[GEMM_KEY]]
  samples, done = [], threading.Event()
  sampler = threading.Thread(target=lambda: [samples.append(os.getloadavg()[0]) for _ in iter(lambda: done.wait(10),
                                                                                                True)], daemon=True)
  sampler.start()
  undo = _timed_steps(seconds) if timed else (lambda: None)
  try:
    spec = jp.PruneSpec(method, pattern, true_sequential=order == "true_sequential")
    outcome = jp.prune(model.params, calib, config=model.config, spec=spec, batch_size=8, progress=False)
  finally:
    undo()
    done.set()
  rates.append(matmul_rates([GEMM])[GEMM_KEY])
  steps = None
  if timed:
    seconds["reports"] = seconds.pop("prune_group") - seconds["solver"]
    steps = {name: seconds[name] for name in STEPS}
    steps["other"] = outcome.seconds - sum(steps.values())
  return {"case": case, "order": order, "warm": warm, "timed": timed, "seconds": outcome.seconds,
          "step_seconds": steps,
          "compile_seconds": sum(COMPILE_SECONDS.values()), "compile_events": dict(COMPILE_SECONDS),
          "load_before": load, "load_after": os.getloadavg(),
          "load_1min_every_10s": {"mean": sum(samples) / max(len(samples), 1), "max": max(samples, default=None)},
          "matmul_gflop_per_s": sum(rates) / 2, "matmul_gflop_per_s_before_after": rates}


def derive(run: dict, config, windows: int, seq: int) -> dict:
  """``run`` with its FLOPs (:func:`pass_flops`), ideal seconds at its matmul rate and ratio, in all and per step
  (a timed run's; ``steps`` is empty for the others)."""
  method = parse_case(run["case"])[0]
  ts = run["order"] == "true_sequential"
  flops = pass_flops(config, windows=windows, seq=seq, method=method, true_sequential=ts)
  computed = pass_flops(config, windows=windows, seq=seq, method=method, true_sequential=ts, computed=True)
  rate = run["matmul_gflop_per_s"] * 1e9
  seconds = run.get("step_seconds") or {name: step["seconds"] for name, step in run.get("steps", {}).items()}
  steps = {name: {"seconds": sec, "gflop": flops.get(name, 0.0) / 1e9, "gflop_computed": computed.get(name, 0.0) / 1e9,
                  "ideal_seconds": flops.get(name, 0.0) / rate,
                  "gflop_per_s": flops[name] / sec / 1e9 if flops.get(name) and sec else None}
           for name, sec in seconds.items()}
  ideal = flops["total"] / rate
  return {**run, "step_seconds": seconds, "tflop": flops["total"] / 1e12, "tflop_computed": computed["total"] / 1e12,
          "ideal_seconds": ideal, "ratio": run["seconds"] / ideal, "steps": steps}


def provenance() -> dict:
  """The commit of this run and the files of ``jaxprune/`` that differ from it."""
  import subprocess

  git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
  return {"commit": git("rev-parse", "HEAD"), "changed": git("status", "--porcelain", "jaxprune").splitlines()}


def table(result: dict) -> str:
  """Markdown: one row per pass; per-step seconds against their ideal seconds for the timed passes."""
  lines = ["| order | case | seconds | TFLOP | GFLOP/s | ideal s | ratio | taps s (ideal) | statistics s (ideal) "
           "| solver s (ideal) | outputs s (ideal) | reports s | other s | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["runs"]:
    s = r["steps"]
    cell = lambda n: f"{s[n]['seconds']:.1f} ({s[n]['ideal_seconds']:.1f})" if s else "—"  # noqa: E731
    rest = (f"{s['reports']['seconds']:.1f} | {s['other']['seconds'] + s['embed']['seconds']:.1f}" if s
            else "— | —")
    kind = ", ".join(k for k, on in (("warm", r.get("warm")), ("timed", s and r.get("timed"))) if on)
    case = r["case"] + (f" ({kind})" if kind else "")
    lines.append(f"| {r['order']} | {case} | {r['seconds']:.1f} | {r['tflop']:.2f} "
                 f"| {r['matmul_gflop_per_s']:.0f} | {r['ideal_seconds']:.1f} | {r['ratio']:.2f} | {cell('taps')} "
                 f"| {cell('statistics')} | {cell('solver')} | {cell('outputs')} | {rest} "
                 f"| {r['compile_seconds']:.1f} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", type=Path, default=Path(__file__).with_name("roofline.json"))
  p.add_argument("--cases", nargs="*", default=list(CASES))
  p.add_argument("--orders", nargs="*", default=list(ORDERS), choices=ORDERS)
  p.add_argument("--windows", type=int, default=None, help="the first N calibration windows [default: all 64]")
  p.add_argument("--warm", action="store_true",
                 help="each case also run again right after, in the same process, every program compiled already, "
                      "then once more with every step timed")
  p.add_argument("--anatomy-only", action="store_true",
                 help="time one block against its matrix products alone (block_anatomy) into --out, nothing else")
  p.add_argument("--only-report", action="store_true",
                 help="recount the FLOPs, ideal seconds and ratios of the runs in --out and print its table")
  args = p.parse_args()
  import jax
  import numpy as np

  import jaxprune as jp

  if args.only_report:
    result = json.loads(args.out.read_text())
    config = jp.load_model("smollm2-135m").config
    result["runs"] = [derive(r, config, *result["tokens"]) for r in result["runs"]]
    write_json(args.out, result)
    print(table(result))
    return

  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **_: COMPILE_SECONDS.update({event: duration}) if "compile" in event else None)
  model = jp.load_model("smollm2-135m")
  calib = np.load(REFERENCE / "calib_512x64.npy")[:args.windows]
  if args.anatomy_only:
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["block_anatomy"] = {"command": command(Path(__file__)), "machine": machine(), **provenance(),
                               **block_anatomy(model, calib.shape[1])}
    write_json(args.out, result)
    print(json.dumps(result["block_anatomy"]))
    return
  shapes = [GEMM, *model_shapes(model.config, calib.shape[1])]
  before = matmul_rates(shapes)
  print(json.dumps({"matmul_gflop_per_s": before}), flush=True)
  result = {"command": command(Path(__file__)), "machine": machine(), **provenance(), "tokens": list(calib.shape),
            "matmul_rates_before": before, "block_anatomy": block_anatomy(model, calib.shape[1]), "runs": []}
  print(json.dumps(result["block_anatomy"]), flush=True)
  for order in args.orders:
    for case in args.cases:
      for warm, timed in ((False, False), (True, False), (True, True)) if args.warm else ((False, False),):
        result["runs"].append(derive(one_case(model, calib, case, order, warm=warm, timed=timed), model.config,
                                     *calib.shape))
        print(json.dumps(result["runs"][-1]), flush=True)
        write_json(args.out, result)
  result["matmul_rates_after"] = matmul_rates(shapes)
  result["load_end"] = os.getloadavg()
  write_json(args.out, result)
  print(table(result))


if __name__ == "__main__":
  main()
