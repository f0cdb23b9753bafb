"""``jaxprune prune --method surgeon``: LLM Surgeon over the whole model (:mod:`jaxprune.prune._surgeon_pass`), with
the checkpoint, resume, progress and JSON conventions of the other methods.

Its JSON adds ``shots``, ``fisher_labels``, ``per_layer_sparsity`` (per block ``{linear: fraction pruned}``),
``shots_report`` (per shot: target, pruned, threshold, seconds) and, with ``--structured``, ``params_before``,
``params_after`` (the shrunk model's parameters), ``params_kept`` and ``layer_widths``. With ``--retrain``, the
spec's ``retrain`` settings, ``retrain_data``, ``train_windows_sha256`` and, per shot,
``shots_report[i].retrain`` (mean training loss on that shot's windows before and after, seconds).
"""
from __future__ import annotations

from jaxprune._commands import common

STRUCTURES = ("rows,cols", "rows,columns")
RETRAIN_FLAGS = ("retrain_steps", "retrain_lr", "retrain_batch", "retrain_data", "retrain_data_start",
                 "retrain_seqlen")
FLAGS = ("shots", "fisher_labels", "structured", "chunk", "allocation", "retrain") + RETRAIN_FLAGS


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
  r = p.add_argument_group("retraining after every shot (--method surgeon; the reference's LoRA between shots), "
                           "merged into the weights before the next shot's curvature; pruned weights stay 0")
  r.add_argument("--retrain", default=None, metavar="SUBSETS",
                 help="trainable subsets that keep the zeros: masklora:R, scalelora:R, norms, biases (models with "
                      "linear biases), head, embeddings, or all (the kept weights) [off]")
  r.add_argument("--retrain-steps", type=int, default=None, help="AdamW steps per shot [20]")
  r.add_argument("--retrain-lr", type=float, default=None, help="peak learning rate [5e-4]")
  r.add_argument("--retrain-batch", type=int, default=None, help="training windows per step [2]")
  r.add_argument("--retrain-data", default=None,
                 help="training text: bundled corpus, text file or .npy windows; shot i trains on the next "
                      "steps x batch windows of it [default: --calib]")
  r.add_argument("--retrain-data-start", type=common.count, default=None, metavar="TOKEN",
                 help="cut the training windows from this token of the text on [0]")
  r.add_argument("--retrain-seqlen", type=common.positive_int, default=None,
                 help="tokens per training window [default: --seqlen; a .npy file's own width]")


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
             "allocation": args.allocation, "retrain": retraining(args)}
  return check_surgeon_spec(SurgeonSpec(pattern, seed=args.seed,
                                        **{k: v for k, v in options.items() if v is not None}))


def retraining(args):
  """The :class:`~jaxprune.prune._surgeon_retrain.Retraining` of ``--retrain`` and its options, or None."""
  from jaxprune.errors import JaxpruneError
  from jaxprune.prune._surgeon_retrain import Retraining

  if args.retrain is None:
    for flag in RETRAIN_FLAGS:
      if getattr(args, flag) is not None:
        raise JaxpruneError(f"--{flag.replace('_', '-')} needs --retrain SUBSETS")
    return None
  for flag in ("retrain_steps", "retrain_batch"):
    if getattr(args, flag) is not None and getattr(args, flag) < 1:
      raise JaxpruneError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
  options = {"steps": args.retrain_steps, "lr": args.retrain_lr, "batch_size": args.retrain_batch}
  return Retraining(args.retrain, seed=args.seed, **{k: v for k, v in options.items() if v is not None})


def training_windows(args, model):
  """``(windows, identity)`` of ``--retrain-data`` (default ``--calib``), checked disjoint from ``--eval``."""
  from jaxprune._commands.retrain import _same_source, check_disjoint, train_windows

  source = str(args.retrain_data or args.calib)
  start = args.retrain_data_start or 0
  seqlen = args.retrain_seqlen or (None if source.endswith(".npy") else args.seqlen)
  windows, _ = train_windows(model, source, start=start, seqlen=seqlen, flag="--retrain-data")
  if args.eval and _same_source(source, str(args.eval)):
    check_disjoint(source, start, common.eval_windows(args, model, args.eval), args.eval, flag="--retrain-data")
  return windows, {"retrain_data": source, "retrain_data_start": start}  # surgeon_prune adds their sha256


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
  train = None
  if spec.retrain is not None:
    from jaxprune.prune._surgeon_retrain import check_training

    train, data = training_windows(args, model)
    check_training(model.params, model.config, spec.retrain, train, mesh=common.mesh(args))  # before any work
    identity.update(data)

  def describe(outcome) -> str:
    text = f"in {spec.shots} shot{'s' if spec.shots > 1 else ''}, {outcome.seconds:.1f} s"
    if "params_after" in outcome.metadata:
      text += f"; parameters {outcome.metadata['params_before']} -> {outcome.metadata['params_after']}"
    if spec.retrain is not None:
      losses = [r["retrain"] for r in outcome.metadata["shots_report"]]
      text += f"; retrained {spec.retrain.spec} after each shot, training loss " + ", ".join(
          f"{r['loss_before']:.3f} -> {r['loss_after']:.3f}" for r in losses)
    return text

  return prune_and_report(args, model, lambda mesh: surgeon_prune(
      model.params, calib.tokens, config=model.config, spec=spec, out=args.out, identity=identity,
      batch_size=args.batch_size, mesh=mesh, train_windows=train), describe)
