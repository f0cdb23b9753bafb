"""The pieces behind the roofline's excess, each timed apart on SmolLM2-135M-Instruct's shapes (one process):

  python experiments/prune_speed/pieces.py       # -> pieces.json beside this script

- ``sparsegpt``: the jitted solver (50 %, with its error, as the pass calls it) on each linear shape of a block
  (``(d_out, d_in)``: q/o 576×576, k/v 192×576, gate/up 1536×576, down 576×1536; a Gram of 4,096 random
  inputs), given the factor of its Gram as the pass gives it (``prepared``), and factorising inside (``whole``):
  the first call (compilation included) and the best of 5 after it; ``prepare``, the factorisation alone
  (:func:`~jaxprune.prune.solvers.sparsegpt_prepare`) at the two input widths. ``block_seconds`` adds the seven
  linears of a block and the four factorisations of its input groups (q/k/v, o, gate/up, down);
  ``block_seconds_whole`` the seven linears each factorising.
- ``cholesky``: ``jnp.linalg.cholesky`` at the two input widths, best of 5, against ``d³/3`` at the 2048³ matmul
  rate measured beside it.
- ``attention``: the attention of one batch (8 windows × 512, 9 query and 3 KV heads of width 64, window by
  window as the pass runs it): :func:`~jaxprune.models._layers.dot_attention` and its score and value products
  alone, best of 7, against those products' FLOPs at the matmul rate.
- ``wanda_statistics``: the squared input norms of block 1's four taps over the 64 × 512 parity windows, by the
  tapped forward then the accumulation (two programs per batch, the taps written out between them) and by the
  pass's one program (:meth:`~jaxprune.runner.Runner.tap_sums`: each window's squares summed in the step that
  computes its taps), best of 5.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import REFERENCE, command, machine, write_json  # noqa: E402

SHAPES = {"q/o": ((576, 576), 2), "k/v": ((192, 576), 2), "gate/up": ((1536, 576), 2), "down": ((576, 1536), 1)}


def timings(fn, repeats: int) -> list[float]:
  """Seconds of ``repeats`` calls of ``fn`` (which waits for its result), after one untimed call."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def best(fn, repeats: int) -> float:
  """The best of :func:`timings`."""
  return min(timings(fn, repeats))


def main() -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jaxprune as jp
  from jaxprune.io._stream import split
  from jaxprune.models._layers import attention_mask, dot_attention
  from jaxprune.prune import _sequential as S
  from jaxprune.prune._patterns import Unstructured
  from jaxprune.prune._stats import Stats, init_stats
  from jaxprune.prune.solvers import sparsegpt, sparsegpt_prepare
  from jaxprune.runner import Runner, as_input

  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((2048, 2048), np.float32))
  product = jax.jit(functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST))
  rate = 2 * 2048**3 / best(lambda: product(a, a).block_until_ready(), 5)
  result = {"command": command(Path(__file__)), "machine": machine(), "matmul_gflop_per_s": rate / 1e9}

  solver = jax.jit(functools.partial(sparsegpt, pattern=Unstructured(0.5)))
  prepare = jax.jit(sparsegpt_prepare)

  def first_and_best(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return {"first_call_seconds": time.perf_counter() - start, "seconds": best(lambda: jax.block_until_ready(fn()), 5)}

  result["sparsegpt"] = {"prepare": {}, "whole": {}}
  stats = {}
  for d_in in sorted({d_in for (_, d_in), _ in SHAPES.values()}):
    x = rng.standard_normal((4096, d_in)).astype(np.float32)
    gram = jnp.asarray(x.T @ x)
    stats[d_in] = Stats(gram=gram, sq_norms=jnp.diag(gram), count=jnp.float32(4096))
    result["sparsegpt"]["prepare"][d_in] = first_and_best(lambda: prepare(stats[d_in]))
  for name, ((d_out, d_in), _) in SHAPES.items():
    w = jnp.asarray(rng.standard_normal((d_out, d_in)).astype(np.float32))
    factor = prepare(stats[d_in])
    result["sparsegpt"][name] = first_and_best(lambda: solver(w, stats[d_in], prepared=factor))
    result["sparsegpt"]["whole"][name] = first_and_best(lambda: solver(w, stats[d_in]))
  linears = sum(result["sparsegpt"][k]["seconds"] * n for k, (_, n) in SHAPES.items())
  factors = {576: 3, 1536: 1}  # q/k/v, o and gate/up read width 576; down reads 1536
  result["sparsegpt"]["block_seconds"] = linears + sum(result["sparsegpt"]["prepare"][d]["seconds"] * n
                                                       for d, n in factors.items())
  result["sparsegpt"]["block_seconds_whole"] = sum(result["sparsegpt"]["whole"][k]["seconds"] * n
                                                   for k, (_, n) in SHAPES.items())

  cholesky = jax.jit(jnp.linalg.cholesky)
  result["cholesky"] = {}
  for d in (576, 1536):
    x = rng.standard_normal((2 * d, d)).astype(np.float32)
    gram = jnp.asarray(x.T @ x)
    seconds = best(lambda: cholesky(gram).block_until_ready(), 5)
    result["cholesky"][d] = {"seconds": seconds, "fraction_of_matmul": d**3 / 3 / rate / seconds}

  b, t, heads, kv, width, chunk = 8, 512, 9, 3, 64, 128
  q = jnp.asarray(rng.standard_normal((b, t, heads, width), np.float32))
  k, v = (jnp.asarray(rng.standard_normal((b, t, kv, width), np.float32)) for _ in range(2))
  mask = attention_mask(None, 1, t)

  def products(q, k, v):
    rows = q.reshape(1, t, kv, heads // kv, width).transpose(0, 2, 1, 3, 4)
    kt, vt = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    outs = [product(product(rows[:, :, lo:lo + chunk].reshape(1, kv, -1, width), kt[..., :lo + chunk]),
                    vt[:, :, :lo + chunk]) for lo in range(0, t, chunk)]
    return jnp.concatenate(outs, axis=2)

  def windowed(fn):
    return jax.jit(lambda q, k, v: jax.lax.map(lambda x: fn(*(y[None] for y in x)), (q, k, v)))

  attention, bare = windowed(lambda q, k, v: dot_attention(q, k, v, mask, chunk=chunk)), windowed(products)
  pairs = sum(chunk * (lo + chunk) for lo in range(0, t, chunk))
  flops = b * 2 * 2 * width * pairs * heads
  result["attention"] = {"ideal_seconds": flops / rate,
                         **{name: best(lambda: jax.block_until_ready(fn(q, k, v)), 7)
                            for name, fn in (("seconds", attention), ("products_seconds", bare))}}

  model = jp.load_model("smollm2-135m")
  config = model.config
  runner = Runner(config, batch_size=8)
  inputs = runner.map_windows(lambda tokens: runner.embed(split(model.params)[0], tokens),
                              np.load(REFERENCE / "calib_512x64.npy"))
  block = runner.place(model.params["layers"][1])
  modes = config.sublayer_modes(1)
  widths = {tap: S.kernel_at(block, paths[0]).shape[0] for tap, paths in S.block_linears(config, block).items()}
  names = tuple(widths)
  batches = list(runner.batches(*inputs.shape[:2]).chunks(inputs))

  def two_programs():
    stats = {tap: init_stats(d, gram=False) for tap, d in widths.items()}
    for h, weights, _ in batches:
      stats = S._accumulate(stats, runner.taps(block, as_input(h, block), names=names, modes=modes), weights,
                            mesh=None)
    jax.block_until_ready(stats)

  def one_program():
    sums = {tap: init_stats(d, gram=False).sq_norms for tap, d in widths.items()}
    for h, weights, _ in batches:
      sums = runner.tap_sums(block, as_input(h, block), weights, sums, names=names, modes=modes)[0]
    jax.block_until_ready(sums)

  result["wanda_statistics"] = {"two_programs_seconds": best(two_programs, 5),
                                "one_program_seconds": best(one_program, 5)}
  out = Path(__file__).with_name("pieces.json")
  write_json(out, result)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
