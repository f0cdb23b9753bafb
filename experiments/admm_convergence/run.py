"""The ADMM weight update against Adam and SGD on one fixed mask (Boža 2024, arXiv:2401.02938, Fig. 1): relative
reconstruction error per iteration on linears of one block of the embedded model, against the exact optimum.

    python experiments/admm_convergence/run.py                 # config.json -> result.json, table.md, plots
    python experiments/admm_convergence/run.py --only-report   # table.md, plot.png, plot_excess.png again

Every method minimises the same objective on the same keep mask ``M`` (Wanda's, per row):
``f(Ŵ) = tr((W − Ŵ) G (W − Ŵ)ᵀ) / tr(W G Wᵀ)``, ``Ŵ`` zero outside ``M``, ``G = Σ_t x_t x_tᵀ`` over the calibration
tokens entering the linear (dense model). All start from ``W ⊙ M`` (iteration 0: Wanda without update).

* ADMM: the iterations of :func:`jaxprune.prune.admm_update`, stepped one at a time (its ``_precondition`` and
  ``_iterate``), ``Ŵ_k = ((W_k + U_k) ⊙ M) D⁻¹`` after iteration ``k``; the last one is checked against
  ``admm_update(iterations=K)``. With ``percdamp > 0`` ADMM solves the ridge problem on ``G + percdamp·diag(G)``.
* Adam (optax, β = 0.9, 0.999, ε = 1e-8, constant lr), SGD and SGD with momentum (lr in units of ``1/L``,
  ``L = 2 λ_max(G) / tr(W G Wᵀ)`` the gradient's Lipschitz constant) on ``V``, with ``Ŵ = V ⊙ M``: full-batch
  gradients ``−2 ((W − Ŵ) G) ⊙ M / tr(W G Wᵀ)`` from the Gram (one matmul a step, as one ADMM iteration).
* The floor: :func:`masked_optimum` in float64, row by row.

Seconds per iteration are measured in this process after compilation, each method's loop jitted whole, without
the per-iteration error evaluation the curves need; the process runs on ``cores`` CPUs of the config (see
:func:`_pin`).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.admm_convergence.report import admm_name, grids, plot, run_names, table  # noqa: E402
from experiments.common import command, machine, parse_case, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
HIGHEST = jax.lax.Precision.HIGHEST
def masked_optimum(w: np.ndarray, gram: np.ndarray, mask: np.ndarray, *, damp: float = 0.0) -> np.ndarray:
  """Float64 minimiser ``Ŵ`` ``(d_out, d_in)`` of ``tr((W − Ŵ) G' (W − Ŵ)ᵀ)`` over ``Ŵ`` zero outside ``mask``,
  ``G' = G + damp·diag(G)`` (``damp = percdamp`` is the problem ADMM solves). Rows are independent: with ``k``
  the kept inputs of row ``i``, ``G'_kk ŵ_k = G'_k,: w_i`` (Cholesky; least squares where ``G'_kk`` is singular).
  """
  import scipy.linalg  # here, not at import: its BLAS threads start with the CPUs the process has then (_pin)

  w, g = np.asarray(w, np.float64), np.asarray(gram, np.float64)
  g = g + damp * np.diag(np.diag(g))
  rhs = w @ g  # row i: G' w_i (G' symmetric)
  out = np.zeros_like(w)
  for i, keep in enumerate(np.asarray(mask, bool)):
    if not keep.any():
      continue
    a, b = g[np.ix_(keep, keep)], rhs[i, keep]
    try:
      out[i, keep] = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a, check_finite=False), b, check_finite=False)
    except np.linalg.LinAlgError:
      out[i, keep] = np.linalg.lstsq(a, b, rcond=None)[0]
  return out


def relative_error(w: np.ndarray, w_hat: np.ndarray, gram: np.ndarray) -> float:
  """``tr(ΔW G ΔWᵀ) / tr(W G Wᵀ)`` in float64."""
  w, g = np.asarray(w, np.float64), np.asarray(gram, np.float64)
  d = w - np.asarray(w_hat, np.float64)
  return float(np.sum(d * (d @ g)) / np.sum(w * (w @ g)))


def block_inputs(model, cfg: dict):
  """``({path: W (d_out, d_in)}, {path: Stats})`` of the configured linears of block ``cfg["layer"]``, from the
  dense model's calibration activations: the runner's embedding and blocks, the pass's own statistics step."""
  from jaxprune import load_windows
  from jaxprune.models._convert import to_hf_layout
  from jaxprune.prune import _sequential as S
  from jaxprune.runner import Runner, as_input

  c = cfg["calib"]
  windows = load_windows(c["data"], tokenizer=model.tokenizer, seqlen=c["seqlen"], role="calib",
                         nsamples=c["nsamples"], seed=c["seed"]).tokens
  config, params = model.config, model.params
  runner = Runner(config, batch_size=cfg["batch_size"])
  h = runner.map_windows(lambda tokens: runner.embed(params, tokens), windows)
  for i in range(cfg["layer"]):
    block = runner.place(params["layers"][i])
    h = runner.map_windows(lambda x: runner.block(block, as_input(x, block), modes=config.sublayer_modes(i)), h)
  block = runner.place(params["layers"][cfg["layer"]])
  groups = S._selected(config, block, frozenset(cfg["linears"]))
  stats = S._statistics(runner, block, h, runner.batches(*h.shape[:2]), groups,
                        modes=config.sublayer_modes(cfg["layer"]), needs_gram=True)
  weights = {p: to_hf_layout(S.kernel_at(block, p)).astype(jnp.float32) for paths in groups.values() for p in paths}
  return weights, {p: stats[tap] for tap, paths in groups.items() for p in paths}


def _residual(w, gram, mask, v):
  """``(W − V⊙M, (W − V⊙M) G)``."""
  d = w - jnp.where(mask, v, 0)
  return d, jnp.matmul(d, gram, precision=HIGHEST)


def _optimizer(kind: str, lr, momentum: float):
  return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8) if kind == "adam" else optax.sgd(lr, momentum=momentum or None)


def _gradient_loop(w, gram, mask, lr, *, kind, momentum, steps, record):
  """``steps`` full-batch steps from ``W ⊙ M``; returns the errors of iterates ``0..steps`` (``record``) or ``V``."""
  energy = jnp.sum(w * jnp.matmul(w, gram, precision=HIGHEST))
  tx = _optimizer(kind, lr, momentum)
  v0 = jnp.where(mask, w, 0)

  def step(carry, _):
    v, state = carry
    d, dg = _residual(w, gram, mask, v)
    grad = jnp.where(mask, -2.0 * dg / energy, 0)  # G symmetric
    updates, state = tx.update(grad, state, v)
    return (optax.apply_updates(v, updates), state), (jnp.sum(d * dg) / energy if record else None)

  (v, _), errors = jax.lax.scan(step, (v0, tx.init(v0)), length=steps)
  if not record:
    return v
  d, dg = _residual(w, gram, mask, v)
  return jnp.append(errors, jnp.sum(d * dg) / energy)


@functools.partial(jax.jit, static_argnames=("kind", "momentum", "steps"))
def gradient_curves(w, gram, mask, lrs, *, kind: str, momentum: float, steps: int) -> jax.Array:
  """Relative errors ``(len(lrs), steps + 1)`` of Adam or SGD at each learning rate of ``lrs``."""
  run = functools.partial(_gradient_loop, kind=kind, momentum=momentum, steps=steps, record=True)
  return jax.vmap(lambda lr: run(w, gram, mask, lr))(lrs)


@functools.partial(jax.jit, static_argnames=("kind", "momentum", "steps"))
def gradient_run(w, gram, mask, lr, *, kind: str, momentum: float, steps: int) -> jax.Array:
  """``Ŵ`` after ``steps`` steps at one learning rate, no error recorded (the timed loop)."""
  v = _gradient_loop(w, gram, mask, lr, kind=kind, momentum=momentum, steps=steps, record=False)
  return jnp.where(mask, v, 0)


@functools.partial(jax.jit, static_argnames=("rho", "percdamp"))
def admm_setup(w, stats, *, rho: float, percdamp: float):
  """ADMM's one-off preconditioning and factorisation: ``(W0, B, Kᵀ, n)``."""
  from jaxprune.prune.solvers._admm import _precondition

  return _precondition(w, stats, percdamp, rho)


def _admm_loop(setup, mask, *, rho, steps, objective=None):
  from jaxprune.prune.solvers._admm import _iterate

  w0, b, k_t, norm = setup

  def step(carry, _):
    carry = _iterate(carry, mask, b, k_t, rho)
    w, u = carry
    return carry, (None if objective is None else objective(jnp.where(mask, w + u, 0) / norm[None, :]))

  (w, u), errors = jax.lax.scan(step, (w0, jnp.zeros_like(w0)), length=steps)
  return jnp.where(mask, w + u, 0) / norm[None, :], errors


@functools.partial(jax.jit, static_argnames=("rho", "percdamp", "steps"))
def admm_curve(w, stats, mask, *, rho: float, percdamp: float, steps: int):
  """``(relative errors of Ŵ_0..Ŵ_steps, Ŵ_steps)`` of ADMM on the fixed ``mask``."""
  gram = stats.gram
  energy = jnp.sum(w * jnp.matmul(w, gram, precision=HIGHEST))

  def objective(w_hat):
    d, dg = _residual(w, gram, mask, w_hat)
    return jnp.sum(d * dg) / energy

  w_hat, errors = _admm_loop(admm_setup(w, stats, rho=rho, percdamp=percdamp), mask, rho=rho, steps=steps,
                             objective=objective)
  return jnp.concatenate([objective(w)[None], errors]), w_hat


@functools.partial(jax.jit, static_argnames=("rho", "steps"))
def admm_run(setup, mask, *, rho: float, steps: int) -> jax.Array:
  """``Ŵ`` after ``steps`` ADMM iterations from a finished setup, no error recorded (the timed loop)."""
  return _admm_loop(setup, mask, rho=rho, steps=steps)[0]


def _seconds(fn, *args, repeats: int, **kw) -> float:
  """Best wall seconds of ``fn(*args, **kw)`` over ``repeats`` calls, after one compiling call."""
  jax.block_until_ready(fn(*args, **kw))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args, **kw))
    times.append(time.perf_counter() - start)
  return min(times)


def _rounded(errors) -> list[float]:
  return [float(f"{e:.6g}") for e in np.asarray(errors, np.float64)]


def _runs(cfg: dict, w, stats, mask, lipschitz: float) -> dict:
  """Every configured run's error curve on one (linear, mask): ``{name: {"family", "setting", "curve"}}``."""
  curves, settings = [], []
  for hp in cfg["admm"]:
    curves.append(admm_curve(w, stats, mask, rho=hp["rho"], percdamp=hp["percdamp"], steps=cfg["admm_steps"])[0])
    settings.append(("admm", hp))
  for family, kind, momentum, values, per_l in grids(cfg):
    lrs = jnp.asarray([v / lipschitz if per_l else v for v in values], jnp.float32)
    curves += list(gradient_curves(w, stats.gram, mask, lrs, kind=kind, momentum=momentum, steps=cfg["steps"]))
    settings += [(family, {"lr": float(lr), "momentum": momentum}) for lr in np.asarray(lrs)]
  return {name: {"family": family, "setting": setting, "curve": _rounded(curve)}
          for name, (family, setting), curve in zip(run_names(cfg), settings, curves)}


def _check_admm(cfg: dict, w, stats, mask, curve) -> dict:
  """The stepped ADMM's last error against ``admm_update`` itself after as many iterations (first ADMM setting)."""
  from jaxprune.prune import admm_update

  hp = cfg["admm"][0]
  lib = admm_update(w, stats, mask=mask, rho=hp["rho"], percdamp=hp["percdamp"], iterations=cfg["admm_steps"])
  return {"iterations": cfg["admm_steps"], "stepped": curve[-1],
          "admm_update": relative_error(w, lib.w, np.asarray(stats.gram))}


def _timings(cfg: dict, w, stats, mask, lipschitz: float) -> dict:
  """Seconds per iteration of each family's jitted loop (``cfg["timing_steps"]`` iterations), ADMM's setup apart,
  and of one ``W G`` product."""
  reps, steps, hp = cfg["timing_repeats"], cfg["timing_steps"], cfg["admm"][0]
  setup = admm_setup(w, stats, rho=hp["rho"], percdamp=hp["percdamp"])
  out = {"admm_setup": _seconds(admm_setup, w, stats, rho=hp["rho"], percdamp=hp["percdamp"], repeats=reps),
         "admm": _seconds(admm_run, setup, mask, rho=hp["rho"], steps=steps, repeats=reps) / steps}
  for family, kind, momentum, lr in [("adam", "adam", 0.0, cfg["adam_lr"][0]),
                                     ("sgd", "sgd", 0.0, 1.0 / lipschitz),
                                     ("sgd_momentum", "sgd", cfg["sgd_momentum"], 1.0 / lipschitz)]:
    out[family] = _seconds(gradient_run, w, stats.gram, mask, jnp.float32(lr), kind=kind, momentum=momentum,
                           steps=steps, repeats=reps) / steps
  out["matmul"] = _seconds(_matmul, w, stats.gram, repeats=reps)
  return {k: float(f"{v:.4g}") for k, v in out.items()}


@jax.jit
def _matmul(a, b):
  return jnp.matmul(a, b, precision=HIGHEST)


def _case(cfg: dict, w, s, pattern) -> tuple[dict, jax.Array]:
  """Mask, floor and every run on one linear at one pattern."""
  from jaxprune.prune import wanda

  gram = np.asarray(s.gram, np.float64)
  mask = wanda(w, s, pattern=pattern).mask
  energy = float(np.sum(np.asarray(w, np.float64) * (np.asarray(w, np.float64) @ gram)))
  lipschitz = 2.0 * float(np.linalg.eigvalsh(gram)[-1]) / energy
  runs = _runs(cfg, w, s, mask, lipschitz)
  first = runs[admm_name(cfg["admm"][0])]["curve"]
  return {"pattern": repr(pattern), "lipschitz": lipschitz,
          "optimum": relative_error(w, masked_optimum(w, gram, mask), gram), "runs": runs,
          "check": _check_admm(cfg, w, s, mask, first)}, mask


def _pin(cores: int | None) -> list[int]:
  """Restricts this process to its first ``cores`` CPUs (all when None); called before JAX's first computation,
  which sizes its thread pool from them, and before SciPy's import, whose OpenBLAS (the LAPACK of JAX's CPU
  Cholesky) starts its threads then. On a machine shared with other jobs, a multi-threaded Cholesky factorisation
  (ADMM's setup) waits on descheduled threads, and its time varies by two orders of magnitude."""
  allowed = sorted(os.sched_getaffinity(0))
  if cores:
    os.sched_setaffinity(0, allowed[:cores])
  return sorted(os.sched_getaffinity(0))


def run(cfg: dict) -> dict:
  from jaxprune import load_model

  cpus = _pin(cfg.get("cores"))
  start = time.perf_counter()
  weights, stats = block_inputs(load_model(cfg["model"]), cfg)
  result = {"cpus": cpus, "statistics_seconds": round(time.perf_counter() - start, 1),
            "tokens": cfg["calib"]["nsamples"] * cfg["calib"]["seqlen"], "layers": {}}
  for path in cfg["linears"]:
    w, s = weights[path], stats[path]
    layer = {"shape": list(w.shape), "patterns": {}}
    for case in cfg["patterns"]:
      t0 = time.perf_counter()
      entry, mask = _case(cfg, w, s, parse_case(f"{cfg['mask']}:{case}")[1])
      if case == cfg["patterns"][0]:
        layer["seconds_per_iteration"] = _timings(cfg, w, s, mask, entry["lipschitz"])
      entry["seconds"] = round(time.perf_counter() - t0, 1)
      layer["patterns"][case] = entry
      print(f"{path} {case}: optimum {entry['optimum']:.5g}, {entry['seconds']} s", flush=True)
    result["layers"][path] = layer
  result["seconds"] = round(time.perf_counter() - start, 1)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", type=Path, default=HERE / "config.json")
  parser.add_argument("--only-report", action="store_true")
  args = parser.parse_args()
  out = HERE / "result.json"
  if args.only_report:
    result = json.loads(out.read_text())
  else:
    cfg = json.loads(args.config.read_text())
    result = {"command": command(Path(__file__)), "config": cfg, "machine": machine(), **run(cfg)}
    write_json(out, result)
  (HERE / "table.md").write_text(table(result))
  plot(result, HERE / "plot.png", excess=False)
  plot(result, HERE / "plot_excess.png", excess=True)
  print(table(result))


if __name__ == "__main__":
  main()
