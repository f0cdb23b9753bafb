"""``jaxprune retrain``: retrain a pruned checkpoint (masked fine-tuning or PERP's subsets and adapters), save it as
a checkpoint, and measure its perplexity before and after.

Training windows are cut without overlap from ``--data`` (from token ``--data-start`` on) and shuffled; the
evaluation windows are the first ones of ``--eval`` (the one evaluation rule). When both name the same text, the
training part must start after the evaluated tokens. Progress is kept in ``OUT.retrain-partial/`` every
``--save-every`` steps: a killed run resumes with the same command and ends with the same weights.
"""
from __future__ import annotations

from pathlib import Path

from jaxprune._commands import common


def add_parser(sub) -> None:
  from jaxprune.retrain import DEFAULT_ALPHA, DEFAULT_TARGETS

  p = sub.add_parser("retrain", help="retrain a pruned model: masked fine-tuning (all) or PERP's biases, norms, "
                                     "head, embeddings and LoRA/MaskLoRA/ScaleLoRA adapters")
  common.add_model_arg(p, " with its pruning masks")
  p.add_argument("--train", required=True,
                 help="trainable subsets, comma-separated: all (masked full fine-tuning), or any of biases, norms, "
                      "head, embeddings plus one adapter lora:R, masklora:R or scalelora:R")
  p.add_argument("--data", default=common.DEFAULT_CALIB,
                 help="training text: bundled corpus, text file or .npy token windows [default: %(default)s]")
  p.add_argument("--data-start", type=common.count, default=0, metavar="TOKEN",
                 help="cut the training windows from this token of the text on [default: %(default)s]")
  p.add_argument("--steps", type=common.positive_int, required=True, help="optimizer steps")
  p.add_argument("--batch-size", type=common.positive_int, default=8,
                 help="training windows per step (and evaluation windows per batch) [default: %(default)s]")
  p.add_argument("--seqlen", type=common.positive_int, default=None,
                 help="tokens per training window [default: 512; a .npy file's own width]")
  p.add_argument("--epochs", action="store_true", help="repeat the training text when the steps need more of it")
  p.add_argument("--lr", type=float, default=5e-4, help="AdamW peak learning rate [default: %(default)s]")
  p.add_argument("--warmup", type=float, default=0.1,
                 help="linear warm-up, fraction of the steps [default: %(default)s]")
  p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay [default: %(default)s]")
  p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip; 0 = off [default: %(default)s]")
  p.add_argument("--accumulate", type=common.positive_int, default=1,
                 help="batches per optimizer step (gradient accumulation) [default: %(default)s]")
  p.add_argument("--remat", action="store_true", help="recompute block activations in the backward pass (memory)")
  p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="LoRA/MaskLoRA alpha [default: %(default)s]")
  p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                 help="linears that get adapters (names inside a block) [default: every projection]")
  p.add_argument("--seed", type=int, default=0, help="data order and adapter init seed [default: %(default)s]")
  p.add_argument("--mask-from-zeros", action="store_true",
                 help="a model without stored masks: take them from its zero weights")
  p.add_argument("--allow-densify", action="store_true",
                 help="merge plain LoRA into a sparse model (fills the pruned weights)")
  p.add_argument("--save-every", type=common.positive_int, default=50,
                 help="save the train state every this many steps [default: %(default)s]")
  p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
  p.add_argument("--overwrite", action="store_true", help="replace an existing jaxprune checkpoint")
  p.add_argument("--eval", default=None, help="perplexity before and after training on this data (e.g. austen)")
  p.add_argument("--eval-seqlen", type=common.positive_int, default=None, metavar="N",
                 help=f"tokens per evaluation window [default: {common.DEFAULT_EVAL_SEQLEN}]")
  p.add_argument("--max-eval-windows", type=common.count, default=common.DEFAULT_EVAL_WINDOWS, metavar="N",
                 help="evaluate the first this many windows; 0 = all [default: %(default)s]")
  common.add_json_arg(p)
  common.add_mesh_arg(p)
  common.add_distributed_args(p)
  p.set_defaults(run=run)


def state_dir(out: Path) -> Path:
  """Where a run writing checkpoint ``out`` keeps its train state."""
  return Path(out).with_name(Path(out).name + ".retrain-partial")


def _check_options(args):
  """The spec and every option that needs no model, before loading one."""
  from jaxprune.errors import JaxpruneError
  from jaxprune.retrain import parse_train_spec

  targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
  spec = parse_train_spec(args.train, alpha=args.alpha, targets=targets)
  if not args.lr > 0:
    raise JaxpruneError(f"--lr must be positive, got {args.lr}")
  if not 0.0 <= args.warmup < 1.0:
    raise JaxpruneError(f"--warmup is a fraction of the steps in [0, 1), got {args.warmup}")
  if args.weight_decay < 0 or args.clip < 0:
    raise JaxpruneError(f"--weight-decay and --clip must be >= 0, got {args.weight_decay} and {args.clip}")
  if args.seqlen is not None and args.seqlen < 2:
    raise JaxpruneError(f"--seqlen must be at least 2, got {args.seqlen}")
  return spec


def _same_source(a: str, b: str) -> bool:
  from jaxprune.data import BUNDLED

  if a in BUNDLED or b in BUNDLED:
    return a == b
  return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def train_windows(model, source, *, start: int = 0, seqlen: int | None = None, flag: str = "--data"):
  """``(windows (n, seqlen) int32, sha256)`` of the training part of ``source`` (non-overlapping windows from token
  ``start`` on; a ``.npy`` file's windows as they are). ``flag`` names the option in errors."""
  import numpy as np

  from jaxprune.data import eval_windows, load_text, tokenize, tokens_sha256
  from jaxprune.data._corpora import is_hub
  from jaxprune.data._windows import check_vocab
  from jaxprune.errors import JaxpruneError

  source = str(source)
  if source.endswith(".npy"):
    if start:
      raise JaxpruneError(f"{flag}-start cuts a text; a .npy file's windows are used as they are")
    data = common.windows(model, source, seqlen=seqlen, role="eval")
    return data.tokens, data.sha256
  if is_hub(source):
    raise JaxpruneError(f"retraining reads a bundled corpus, a text file or .npy windows, not {source!r}")
  seqlen = seqlen or common.DEFAULT_EVAL_SEQLEN
  limit = model.config.max_position_embeddings
  if seqlen > limit:
    raise JaxpruneError(f"{flag.replace('data', 'seqlen')} {seqlen} exceeds the model's {limit} positions "
                        "(max_position_embeddings)")
  stream = tokenize(load_text(source), model.tokenizer)
  if start >= stream.size:
    raise JaxpruneError(f"{flag}-start {start} is beyond the {stream.size} tokens of {source}")
  windows = eval_windows(stream[start:], seqlen)
  check_vocab(windows, model.config.vocab_size, source)
  return np.ascontiguousarray(windows), tokens_sha256(windows)


def check_disjoint(data, start: int, evals, eval_source, *, flag: str = "--data") -> None:
  """Training windows of ``data`` (from token ``start``) and evaluation windows ``evals`` of ``eval_source`` must
  not overlap: evaluation reads the first tokens of its text. ``flag`` names the training option in errors."""
  from jaxprune.errors import JaxpruneError

  if evals is None or not _same_source(str(data), str(eval_source)):
    return
  if str(data).endswith(".npy"):
    raise JaxpruneError(f"{flag} and --eval are the same token file {data}: training and evaluation windows "
                        "would overlap; evaluate on other windows")
  used = evals.num_windows * evals.seqlen
  if start < used:
    raise JaxpruneError(f"{flag} and --eval are the same text ({data}) and evaluation reads its first {used} "
                        f"tokens: start training after them with {flag}-start {used}, or evaluate on another text")


def run(args) -> dict:
  from jaxprune.io._checkpoint import save_checkpoint
  from jaxprune.prune._job import check_out, mask_tree
  from jaxprune.retrain import _state, check_budget, prepare, retrain
  from jaxprune.runner import Runner

  spec = _check_options(args)
  check_out(args.out, args.overwrite)
  partial = state_dir(args.out)
  if _state.has_state(partial):
    _state.read_progress(partial)  # a damaged state is named before any work
  model = common.load(args.model, with_masks=True)
  params, config, masks, spec = prepare(model.params, model.config, model.masks, spec,
                                        mask_from_zeros=args.mask_from_zeros, allow_densify=args.allow_densify)
  windows, sha256 = train_windows(model, args.data, start=args.data_start, seqlen=args.seqlen)
  evals = common.eval_windows(args, model, args.eval) if args.eval else None
  check_disjoint(args.data, args.data_start, evals, args.eval)
  mesh = common.mesh(args)
  batch = Runner(config, mesh=mesh, batch_size=args.batch_size).batches(args.batch_size, windows.shape[1]).batch
  check_budget(len(windows), windows.shape[1], steps=args.steps, batch=batch, accumulate=args.accumulate,
               epochs=args.epochs)
  before = common.evaluate(args, params, config, evals, mesh=mesh, desc="eval before") if evals else None
  identity = {"model": str(args.model), "data": str(args.data), "data_start": args.data_start,
              "data_sha256": sha256, "epochs": args.epochs}
  common.log(f"retrain {spec}: {args.steps} steps x {batch * args.accumulate} windows x {windows.shape[1]} tokens "
             f"of {args.data} ({len(windows)} windows)")
  result = retrain(params, config, masks, spec, windows, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip or None,
                   accumulate=args.accumulate, remat=args.remat, epochs=args.epochs, seed=args.seed,
                   allow_densify=args.allow_densify, mesh=mesh, state_dir=partial, save_every=args.save_every,
                   identity=identity)
  after = common.evaluate(args, result.params, result.config, evals, mesh=mesh) if evals else None
  keep_masks = result.masks is not None and spec.adapter != "lora"
  info = {**result.to_json(), "data": str(args.data), "data_start": args.data_start, "data_sha256": sha256,
          "seqlen": int(windows.shape[1]), "batch": batch, "lr": args.lr, "seed": args.seed}
  metadata = {k: v for k, v in model.metadata.items() if k not in ("eval", "sparsity")}
  metadata.update(retrain=info, sparsity=result.sparsity)
  if after is not None:
    metadata.update(eval=after, eval_before=before)
  save_checkpoint(args.out, result.config, result.params, masks=mask_tree(result.masks) if keep_masks else None,
                  metadata=metadata, tokenizer=model.tokenizer if model.tokenizer_path else None,
                  overwrite=args.overwrite)
  _state.clear_state(partial)
  common.log(f"wrote checkpoint {args.out}")
  summary = (f"retrained {result.trainable_params} of {result.total_params} parameters "
             f"({100 * result.trainable_fraction:.4g} %) on {result.tokens} tokens in {result.seconds:.1f} s "
             f"({result.tokens_per_second:.0f} tokens/s); sparsity {result.sparsity:.4f}")
  if after is not None:
    summary += f"; perplexity {before['perplexity']:.4f} -> {after['perplexity']:.4f} on {after['data']}"
  common.say(args, summary)
  out = {**info, **common.eval_result(after)}
  if before is not None:
    out.update(eval_before=before, perplexity_before=before["perplexity"])
  return out


def add_reconstruct_args(p) -> None:
  """``--reconstruct`` and its options, for ``jaxprune prune`` (layer-wise reconstruction after each block)."""
  g = p.add_argument_group("layer-wise reconstruction (PERP): after each block is pruned, fit a subset of it to the "
                           "dense block's outputs on the calibration windows")
  g.add_argument("--reconstruct", default=None, metavar="SUBSETS",
                 help="trainable subset of each block, e.g. biases,norms or masklora:16 or all (the kept weights)")
  g.add_argument("--reconstruct-steps", type=common.positive_int, default=50,
                 help="AdamW steps per block, --batch-size calibration windows each [default: %(default)s]")
  g.add_argument("--reconstruct-lr", type=float, default=5e-4, help="AdamW peak learning rate [default: %(default)s]")


def reconstruction(args, model):
  """``(Reconstruction or None, model)`` from the ``--reconstruct`` options, checked before any work; ``biases`` on
  a model without linear biases adds zero ones (the model returned carries them and its config says so)."""
  import dataclasses

  from jaxprune.retrain import with_biases
  from jaxprune.retrain._reconstruct import parse_reconstruction
  from jaxprune.retrain._train import _has_linear_biases

  if args.reconstruct is None:
    return None, model
  recon = parse_reconstruction(args.reconstruct, steps=args.reconstruct_steps, lr=args.reconstruct_lr,
                               batch_size=args.batch_size, seed=args.seed)
  if "biases" in recon.spec.subsets and not _has_linear_biases(model.params):
    params, config = with_biases(model.params, model.config)
    model = dataclasses.replace(model, params=params, config=config)
  return recon, model
