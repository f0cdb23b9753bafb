"""How a block's windows are batched inside its compiled programs, against their FLOP time: the pass's choice (one
window at a time, ``jaxprune.runner._forward``) and the alternatives, in one process.

  python experiments/prune_speed/windowing.py          # -> windowing.json beside this script (about 2 min)

The forward programs of a Wanda pass (``programs.py``'s keys), on block 1 of SmolLM2-135M-Instruct and one batch of
8 parity calibration windows × 512 tokens, each compiled once per batching:

- ``window``: the windows one at a time (a ``lax.map`` over the batch): the runner's default on a CPU;
- ``pairs``, ``quads``: 2 or 4 windows at a time, batched (a ``lax.map`` over groups of windows);
- ``batch``: the whole batch at once (the default on accelerators and multi-device meshes);
- ``attention``: the whole batch at once except the attention's scores, softmax and values, window by window.

Programs and batchings are timed in turn (each call waits for its result), best of ``--rounds`` after a call that
compiles; ``ratio`` = seconds / (the program's matrix-product FLOPs at the 2048³ float32 matmul rate, the mean of
its measurements before and after). The batchings other than ``window`` are built for this script by replacing the
runner's window loop and the LLaMA block's attention while tracing; the library is not changed.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import REFERENCE, command, machine, write_json  # noqa: E402
from experiments.prune_speed.programs import program_flops, program_key  # noqa: E402
from experiments.prune_speed.roofline import GEMM, GEMM_KEY, matmul_rates  # noqa: E402

# batching -> the runner's static ``windowed`` value that selects it here (one compilation cache entry each)
BATCHINGS = {"window": True, "pairs": 2, "quads": 4, "batch": False, "attention": "attention"}
_ATTENTION_BY_WINDOW = contextvars.ContextVar("attention_by_window", default=False)


@contextlib.contextmanager
def batchings():
  """Lets the runner's ``windowed`` select every batching of :data:`BATCHINGS` while inside."""
  import jax
  import jax.numpy as jnp

  from jaxprune.models import _llama
  from jaxprune.runner import _forward

  by_window, attention = _forward._window_by_window, _llama.dot_attention

  def grouped(fn, windowed, *xs):
    if isinstance(windowed, bool):
      return by_window(fn, windowed, *xs)
    if windowed == "attention":
      token = _ATTENTION_BY_WINDOW.set(True)
      try:
        return fn(*xs)
      finally:
        _ATTENTION_BY_WINDOW.reset(token)
    b = jax.tree.leaves(xs)[0].shape[0]
    out = jax.lax.map(lambda group: fn(*group),
                      jax.tree.map(lambda x: x.reshape(b // windowed, windowed, *x.shape[1:]), xs))
    return jax.tree.map(lambda y: y.reshape(b, *y.shape[2:]), out)

  def dot_attention(q, k, v, mask, **kw):
    if not _ATTENTION_BY_WINDOW.get():
      return attention(q, k, v, mask, **kw)
    mask = jnp.broadcast_to(mask, (q.shape[0], *mask.shape[1:]))
    return jax.lax.map(lambda x: attention(*(y[None] for y in x), **kw)[0], (q, k, v, mask))

  _forward._window_by_window, _llama.dot_attention = grouped, dot_attention
  try:
    yield
  finally:
    _forward._window_by_window, _llama.dot_attention = by_window, attention


# (order, label, runner step, taps summed, taps kept, taps given): the forward programs of a Wanda pass
STEPS = (("default", "dense taps", "taps", ("attn_in", "o_in", "mlp_in", "down_in"), (), ()),
         ("default", "block", "outputs", (), (), ()),
         ("true_sequential", "attn_in", "taps", ("attn_in",), (), ()),
         ("true_sequential", "o_in", "taps", ("o_in",), ("o_in",), ()),
         ("true_sequential", "mlp_in", "taps", ("mlp_in",), ("mlp_in", "mid"), ("o_in",)),
         ("true_sequential", "down_in", "taps", ("down_in",), ("down_in",), ("o_in", "mlp_in", "mid")),
         ("true_sequential", "output", "outputs", (), (), ("o_in", "mlp_in", "down_in", "mid")))
ORDERS = ("default", "true_sequential")


def step_key(step) -> str:
  """``programs.py``'s key of a step of :data:`STEPS` (what its FLOPs and results are filed under)."""
  _, _, kind, names, keep, given = step
  return program_key(kind, {"names": names, "keep": keep, "given": dict.fromkeys(given)})


def programs(runner, block, h, modes, taps: dict) -> dict:
  """``{key: a call that runs the program and waits}`` for every step of :data:`STEPS` on ``runner``."""
  import jax
  import jax.numpy as jnp

  weights = jnp.ones((h.shape[0],), jnp.float32)

  def program(step):
    _, _, kind, names, keep, given = step
    given = {n: taps[n] for n in given} or None
    if kind == "outputs":
      return lambda: jax.block_until_ready(runner.block(block, h, modes=modes, given=given))
    return lambda: jax.block_until_ready(runner.tap_sums(
      block, h, weights, {n: jnp.zeros((taps[n].shape[-1],), jnp.float32) for n in names},  # donated by the call
      names=names, keep=keep, modes=modes, given=given))

  return {step_key(step): program(step) for step in STEPS}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  import jax.numpy as jnp
  import numpy as np

  import jaxprune as jp
  from jaxprune.io._stream import split
  from jaxprune.runner import Runner, as_input

  model = jp.load_model("smollm2-135m")
  config = model.config
  tokens = np.load(REFERENCE / "calib_512x64.npy")[:8]
  flops = program_flops(config, tokens.shape[1], tokens.shape[0])
  rates = [matmul_rates([GEMM])[GEMM_KEY]]
  with batchings():
    runners = {name: Runner(config, batch_size=len(tokens), windowed=value) for name, value in BATCHINGS.items()}
    first = runners["window"]
    block = first.place(model.params["layers"][1])
    modes = config.sublayer_modes(1)
    h = as_input(first.embed(split(model.params)[0], jnp.asarray(tokens)), block)
    taps = first.taps(block, h, names=("attn_in", "o_in", "mlp_in", "down_in", "mid"), modes=modes)
    calls = {name: programs(runner, block, h, modes, taps) for name, runner in runners.items()}
    for per_program in calls.values():
      for call in per_program.values():
        call()
    seconds = {name: dict.fromkeys(calls[name], float("inf")) for name in calls}
    for _ in range(args.rounds):
      for program in calls["window"]:
        for name, per_program in calls.items():
          start = time.perf_counter()
          per_program[program]()
          seconds[name][program] = min(seconds[name][program], time.perf_counter() - start)
  rates.append(matmul_rates([GEMM])[GEMM_KEY])
  rate = sum(rates) / 2 * 1e9
  results = {}
  for name, per_program in seconds.items():
    results[name] = {"programs": {p: {"seconds": s, "ideal_seconds": flops[p] / rate,
                                      "ratio": s * rate / flops[p] if flops[p] else None}
                                  for p, s in per_program.items()}}
    for order in ORDERS:
      keys = [step_key(step) for step in STEPS if step[0] == order]
      total, ideal = sum(per_program[k] for k in keys), sum(flops[k] for k in keys) / rate
      results[name][order] = {"seconds": total, "ideal_seconds": ideal, "ratio": total / ideal}
  write_json(Path(__file__).with_name("windowing.json"),
             {"command": command(Path(__file__)), "machine": machine(), "windows": list(tokens.shape),
              "rounds": args.rounds, "matmul_gflop_per_s_before_after": rates, "batchings": results})
  print(f"2048³ rate {rates[0]:.0f} / {rates[1]:.0f} GFLOP/s")
  for name, r in results.items():
    print(f"{name:9s} " + "  ".join(f"{o} {r[o]['seconds'] * 1e3:.1f} ms ({r[o]['ratio']:.2f}×)" for o in ORDERS)
          + "  " + "  ".join(f"{step[1]} {r['programs'][step_key(step)]['seconds'] * 1e3:.1f}"
                             for step in STEPS))


if __name__ == "__main__":
  main()
