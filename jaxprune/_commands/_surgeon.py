"""``jaxprune prune --method surgeon``: LLM Surgeon over the whole model (:mod:`jaxprune.prune._surgeon_pass`), with
the checkpoint, resume, progress and JSON conventions of the other methods.

Its JSON adds ``shots``, ``fisher_labels``, ``per_layer_sparsity`` (per block ``{linear: fraction pruned}``),
``shots_report`` (per shot: target, pruned, threshold, seconds) and, with ``--structured``, ``params_before``,
``params_after`` (the shrunk model's parameters), ``params_kept`` and ``layer_widths``.
"""
from __future__ import annotations

from jaxprune._commands import common

STRUCTURES = ("rows,cols", "rows,columns")
FLAGS = ("shots", "fisher_labels", "structured", "chunk", "allocation")


def add_args(p) -> None:
  """The surgeon-only options of ``jaxprune prune``."""
  g = p.add_argument_group("LLM Surgeon (--method surgeon): one global allocation over all layers")
  g.add_argument("--shots", type=int, default=None,
                 help="shots T: shot i prunes to i*S/T, recomputing the curvature on the model pruned so far [1]")
  g.add_argument("--fisher-labels", choices=("sampled", "data"), default=None,
                 help="labels of the Fisher: drawn from the model (the true Fisher) or the data's [sampled]")
  g.add_argument("--structured", default=None, metavar="rows,cols|units",
                 help="rows,cols: remove whole rows and columns of every linear, --sparsity the fraction of their "
                      "weights (a linear losing r rows and c columns loses r*cols+c*rows-r*c); units: remove whole "
                      "MLP units and groups of heads (a KV head with its query heads), --sparsity the fraction of "
                      "the model's parameters; the model then shrinks")
  g.add_argument("--allocation", choices=("global", "layer"), default=None,
                 help="how much each linear loses: one threshold over all layers' costs (the paper's), or the same "
                      "fraction of every linear, chosen by its own costs [global]")
  g.add_argument("--chunk", type=int, default=None,
                 help="removed weights solved jointly in an element update: the reference's max_correlate, "
                      "each chunk a chunk x chunk solve; on a CPU 64 is about 50 times faster than 2000 [2000]")


def refuse(args) -> None:
  """Surgeon-only options given with another method: a one-line error."""
  from jaxprune.errors import JaxpruneError

  for flag in FLAGS:
    if getattr(args, flag, None) is not None:
      raise JaxpruneError(f"--{flag.replace('_', '-')} applies to --method surgeon only")


def spec_from_args(args):
  """The :class:`~jaxprune.prune._surgeon_pass.SurgeonSpec` of the command line (one-line errors)."""
  from jaxprune.errors import JaxpruneError
  from jaxprune.prune import parse_pattern
  from jaxprune.prune._surgeon_pass import RowsColumns, SurgeonSpec, Units, check_surgeon_spec
  from jaxprune._commands.prune import METHOD_OPTIONS

  if args.shots is not None and args.shots < 1:
    raise JaxpruneError(f"--shots must be at least 1, got {args.shots}")
  for flag in METHOD_OPTIONS:
    if getattr(args, flag) is not None:
      raise JaxpruneError(f"--{flag.replace('_', '-')} does not apply to surgeon")
  if args.true_sequential:
    raise JaxpruneError("--true-sequential does not apply to surgeon: it prunes all layers at once, each shot")
  for flag in ("targets", "ignore"):
    if getattr(args, flag, None):
      raise JaxpruneError(f"--{flag} does not apply to surgeon: one allocation covers every linear")
  if args.scope is not None:
    raise JaxpruneError("--scope does not apply to surgeon: one threshold ranks all layers together")
  if args.structured is not None:
    if args.nm is not None:
      raise JaxpruneError("--structured removes whole rows and columns; it cannot be combined with --nm")
    structure = args.structured.replace(" ", "")
    if structure not in STRUCTURES + ("units",):
      raise JaxpruneError("--structured takes rows,cols (whole rows and columns) or units (whole MLP units and "
                          f"groups of heads), got {args.structured!r}")
    if args.sparsity is None:
      raise JaxpruneError("--structured needs --sparsity (the fraction of the linears' weights, or with units of "
                          "the model's parameters, to remove)")
    pattern = Units(args.sparsity) if structure == "units" else RowsColumns(args.sparsity)
  else:
    pattern = parse_pattern(0.5 if args.sparsity is None and args.nm is None else args.sparsity, args.nm)
  options = {"shots": args.shots, "fisher_labels": args.fisher_labels, "chunk": args.chunk,
             "allocation": args.allocation}
  return check_surgeon_spec(SurgeonSpec(pattern, seed=args.seed,
                                        **{k: v for k, v in options.items() if v is not None}))


def run(args) -> dict:
  from jaxprune._commands.prune import prune_and_report
  from jaxprune.prune import _job as job
  from jaxprune.prune._surgeon_pass import surgeon_prune

  from jaxprune.errors import JaxpruneError

  for flag in ("stream", "blocks"):
    if getattr(args, flag, None):
      raise JaxpruneError(f"--{flag} does not apply to --method surgeon (its curvature needs the whole model)")
  spec = spec_from_args(args)
  job.check_out(args.out, args.overwrite)
  model = common.load(args.model, **({"dtype": args.dtype} if getattr(args, "dtype", None) else {}))
  calib = common.windows(model, args.calib, seqlen=args.seqlen, role="calib", nsamples=args.nsamples,
                         seed=args.seed)
  identity = {"model": args.model, "seqlen": args.seqlen, "calib": calib.source, "calib_sha256": calib.sha256,
              "nsamples": int(calib.tokens.shape[0]), "seed": args.seed}

  def describe(outcome) -> str:
    text = f"in {spec.shots} shot{'s' if spec.shots > 1 else ''}, {outcome.seconds:.1f} s"
    if "params_after" in outcome.metadata:
      text += f"; parameters {outcome.metadata['params_before']} -> {outcome.metadata['params_after']}"
    return text

  return prune_and_report(args, model, lambda mesh: surgeon_prune(
      model.params, calib.tokens, config=model.config, spec=spec, out=args.out, identity=identity,
      batch_size=args.batch_size, mesh=mesh), describe)
