"""``jaxprune prune``: one-shot pruning of every linear of every block, then a checkpoint (and a perplexity)."""
from __future__ import annotations

from jaxprune._commands import _surgeon, common
from jaxprune._commands.retrain import add_reconstruct_args, reconstruction

METHOD_OPTIONS = {  # CLI flag -> solver keyword
    "blocksize": "blocksize", "percdamp": "percdamp", "rho": "rho", "iterations": "iterations",
    "mask_iterations": "mask_iterations", "schedule": "schedule", "ties": "ties",
}


def add_parser(sub) -> None:
  p = sub.add_parser("prune", help="prune a model layer by layer (magnitude, wanda, sparsegpt, admm)")
  common.add_model_arg(p)
  common.add_dtype_arg(p)
  p.add_argument("--method", default="wanda",
                 help="magnitude, wanda, sparsegpt, admm, or surgeon (LLM Surgeon: all layers at once, in shots) "
                      "[default: %(default)s]")
  shape = p.add_mutually_exclusive_group()
  shape.add_argument("--sparsity", type=float, default=None,
                     help="unstructured: fraction of weights pruned, in [0, 1) [default: 0.5]")
  shape.add_argument("--nm", default=None, help="N:M: keep N weights in every M consecutive inputs, e.g. 2:4")
  p.add_argument("--scope", choices=("layer", "row"), default=None,
                 help="unstructured ranking scope [default: magnitude per layer, wanda and admm per row; "
                      "sparsegpt ranks per column block and takes no scope]")
  common.add_calib_args(p, nsamples=64)
  p.add_argument("--seed", type=int, default=0, help="calibration sampling seed [default: %(default)s]")
  p.add_argument("--true-sequential", action="store_true",
                 help="prune the linears of a block group by group (q/k/v, o, gate/up, down), each from inputs "
                      "computed with the groups before it pruned: one forward per block instead of two "
                      "[default: all groups from the dense block's inputs, as the reference codes]")
  p.add_argument("--targets", nargs="+", action="extend", default=None, metavar="PATTERN",
                 help="prune only the linears whose module name matches: a glob on a name such as "
                      "layers.0.mlp.down_proj or any dot-tail of it (down_proj, mlp.*), or re:REGEX "
                      "[default: every linear]")
  p.add_argument("--ignore", nargs="+", action="extend", default=None, metavar="PATTERN",
                 help="leave these linears dense (same patterns), e.g. --ignore down_proj 'layers.0.*'")
  p.add_argument("--blocks", type=block_range, default=None, metavar="FIRST:STOP",
                 help="prune only blocks FIRST <= i < STOP (the others stay as they are), e.g. 0:2 to try a slow "
                      "method on the first blocks of a large model [default: all]")
  common.add_stream_arg(p)
  common.add_output_args(p)
  add_reconstruct_args(p)
  g = p.add_argument_group("method options (defaults: each reference implementation's)")
  g.add_argument("--blocksize", type=int, help="SparseGPT column block [128]")
  g.add_argument("--percdamp", type=float, help="relative damping [SparseGPT 0.01, ADMM 0.1]")
  g.add_argument("--rho", type=float, help="ADMM penalty [1.0]")
  g.add_argument("--iterations", type=int, help="ADMM iterations [20]")
  g.add_argument("--mask-iterations", type=int, help="ADMM iterations that re-select the mask [15]")
  g.add_argument("--schedule", choices=("cubic", "final"),
                 help="ADMM mask schedule: the paper's cubic one, or 'final' (the reference code's) [cubic]")
  g.add_argument("--ties", choices=("count", "threshold"),
                 help="magnitude/SparseGPT unstructured: prune exactly floor(s*n) ('count'), or every score up to "
                      "the next one as the reference codes do ('threshold') [count]")
  _surgeon.add_args(p)
  common.add_mesh_arg(p)
  common.add_distributed_args(p)
  p.set_defaults(run=run)


def spec_from_args(args):
  from jaxprune.errors import JaxpruneError
  from jaxprune.prune import parse_pattern
  from jaxprune.prune._job import check_prune_spec
  from jaxprune.prune._sequential import PruneSpec
  from jaxprune.prune.solvers import get_solver, solver_options

  get_solver(args.method)  # an unknown method is named before its options
  sparsity = 0.5 if args.sparsity is None and args.nm is None else args.sparsity
  pattern = parse_pattern(sparsity, args.nm, scope=args.scope)
  accepted = solver_options(args.method)
  hparams = {}
  for flag, name in METHOD_OPTIONS.items():
    value = getattr(args, flag)
    if value is None:
      continue
    if name not in accepted:
      raise JaxpruneError(f"--{flag.replace('_', '-')} does not apply to {args.method}")
    hparams[name] = value
  if args.true_sequential and not get_solver(args.method).needs_calibration:
    raise JaxpruneError(f"--true-sequential needs calibration; {args.method} uses none")
  return check_prune_spec(PruneSpec(args.method, pattern, tuple(sorted(hparams.items())),
                                    true_sequential=args.true_sequential))


def run(args) -> dict:
  if args.method == "surgeon":
    return _surgeon.run(args)
  _surgeon.refuse(args)
  from jaxprune.prune import _job as job
  from jaxprune.prune._sequential import check_spec
  from jaxprune.prune._targets import select_linears

  spec = spec_from_args(args)
  job.check_out(args.out, args.overwrite)
  model = common.load(args.model, dtype=args.dtype, stream=args.stream)
  recon, model = reconstruction(args, model)  # checked before any work
  if args.blocks is not None:
    job.check_blocks(args.blocks, model.config.num_layers)
  if args.targets or args.ignore:
    select_linears(model.config, args.targets, args.ignore)  # a pattern matching nothing fails before any work
  check_spec(spec, model.config, model.params)  # a pattern or option the solver cannot take fails before any work
  calib = None
  identity = {"model": args.model, "seqlen": args.seqlen}
  if spec.method != "magnitude" or recon is not None:
    calib = common.windows(model, args.calib, seqlen=args.seqlen, role="calib", nsamples=args.nsamples,
                           seed=args.seed)
    identity.update(calib=calib.source, calib_sha256=calib.sha256, nsamples=int(calib.tokens.shape[0]),
                    seed=args.seed)
  return prune_and_report(args, model, lambda mesh: job.prune(
      model.params, None if calib is None else calib.tokens, config=model.config, spec=spec, out=args.out,
      identity=identity, batch_size=args.batch_size, mesh=mesh, reconstruct=recon, targets=args.targets,
      ignore=args.ignore, blocks=args.blocks), lambda outcome: f"in {outcome.seconds:.1f} s")


def block_range(text: str) -> tuple[int, int]:
  """``FIRST:STOP`` -> ``(FIRST, STOP)`` (checked against the model once it is loaded)."""
  import argparse

  first, sep, stop = text.partition(":")
  try:
    if not sep:
      raise ValueError
    return int(first), int(stop)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected FIRST:STOP (e.g. 0:2), got {text!r}") from None


def prune_and_report(args, model, prune, describe) -> dict:
  """The common end of every ``prune`` method: reads the evaluation windows (bad eval data fails before any
  work), scores the dense model when ``--eval-dense`` asks, runs ``prune(mesh)``, scores and saves its outcome,
  prints the per-block table and one summary line (``describe(outcome)`` after the sparsity), and returns the
  command's JSON."""
  from jaxprune.prune import _job as job

  evals = common.eval_windows(args, model, args.eval) if args.eval else None
  mesh = common.mesh(args)
  dense = None
  if evals is not None and args.eval_dense:
    dense = common.evaluate(args, model.params, model.config, evals, mesh=mesh, desc="eval dense")
  outcome = prune(mesh)
  block = None
  if evals is not None:
    block = common.evaluate(args, outcome.params, outcome.config or model.config, evals, mesh=mesh)
    outcome.metadata["eval"] = block
  outcome.metadata.update(model.provenance)
  job.save_outcome(outcome, args.out, model.config, tokenizer=model.tokenizer if model.tokenizer_path else None,
                   overwrite=args.overwrite)
  common.log(f"wrote checkpoint {args.out}")
  common.say(args, layer_table(outcome.metadata["layers"]))
  summary = f"sparsity {outcome.metadata['sparsity']:.4f} of the pruned linears {describe(outcome)}"
  if block is not None:
    summary += f"; perplexity {block['perplexity']:.4f} on {block['data']}"
    if dense is not None:
      summary += f" (dense {dense['perplexity']:.4f})"
  common.say(args, summary)
  kept = {k: v for k, v in outcome.metadata.items() if k not in ("eval", "generation_config", "versions")}
  return common.with_io_seconds(args, {**kept, "prune_seconds": round(outcome.seconds, 2),
                                        **common.eval_result(block, dense)})


def layer_table(layers: list[dict]) -> str:
  """One line per block: sparsity and reconstruction error of its linears (relative, when the pass reports it:
  error over the dense output's energy)."""
  by_block: dict[int, list[dict]] = {}
  for r in layers:
    by_block.setdefault(int(r.get("layer", 0)), []).append(r)
  relative = all("relative_error" in r for r in layers)
  lines = [f"{'block':>5}  {'sparsity':>8}  {'error':>10}" + (f"  {'rel. error':>10}" if relative else "")]
  for i, reports in sorted(by_block.items()):
    sparsity = sum(r["sparsity"] for r in reports) / len(reports)
    line = f"{i:>5}  {sparsity:>8.4f}  {sum(r['error'] for r in reports):>10.4g}"
    if relative:
      line += f"  {max(r['relative_error'] for r in reports):>10.4g}"
    lines.append(line)
  return "\n".join(lines)
