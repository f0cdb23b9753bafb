"""``jaxprune depth``: score blocks or sublayers, remove the least important, recover, save (and evaluate)."""
from __future__ import annotations

from jaxprune._commands import common


def add_parser(sub) -> None:
  p = sub.add_parser("depth", help="remove whole blocks, or attention/MLP sublayers, by importance "
                                   "(cosine, angular, angular_last, loss, shapley, shapley_near), with optional "
                                   "bias/low-rank recovery, fitted in closed form or trained")
  common.add_model_arg(p)
  common.add_dtype_arg(p)
  p.add_argument("--metric", default="cosine",
                 help="importance: cosine (block influence), angular, angular_last (angular distance at the last "
                      "token of each window), loss (leave-one-out), shapley (uniform permutations) or shapley_near "
                      "(sub-networks near the full model) [default: %(default)s]")
  p.add_argument("--unit", default="block", help="what to remove: block, attention or mlp [default: %(default)s]")
  howmany = p.add_mutually_exclusive_group(required=True)
  howmany.add_argument("--remove", type=int, default=None, help="number of units to remove")
  howmany.add_argument("--fraction", type=float, default=None, help="fraction of the units to remove, in [0, 1]")
  p.add_argument("--iterative", action="store_true", help="remove one unit at a time and re-score in between")
  p.add_argument("--recover", default="none",
                 help="replacement of each removed unit: none, bias, or lowrank:R [default: %(default)s]")
  p.add_argument("--damp", type=float, default=1e-2,
                 help="ridge damping of lowrank:R, relative to the mean input variance [default: %(default)s]")
  p.add_argument("--recover-fit", default="closed",
                 help="how adapters are fitted: closed (closed form), mse (trained to emulate the removed unit's "
                      "update) or lm (trained on the calibration LM loss) [default: %(default)s]")
  p.add_argument("--recover-init", default="zero",
                 help="start of a trained fit: zero (the skip) or closed (the closed-form fit) [default: %(default)s]")
  p.add_argument("--recover-steps", type=int, default=200,
                 help="AdamW steps of a trained fit (per unit for mse) [default: %(default)s]")
  p.add_argument("--recover-lr", type=float, default=1e-2,
                 help="peak learning rate of a trained fit [default: %(default)s]")
  common.add_calib_args(p, nsamples=16)
  p.add_argument("--seed", type=int, default=0,
                 help="calibration, sampling and recovery-training seed [default: %(default)s]")
  p.add_argument("--samples", type=int, default=8,
                 help="shapley: sampled permutations; shapley_near: rounds of sub-networks, each unit left out at "
                      "least once per round [default: %(default)s]")
  p.add_argument("--near", type=int, default=None,
                 help="shapley_near: units removed from each sub-network [default: n - floor(0.9 n) of the n "
                      "candidates: sub-networks of 90 %% of the units, as in Siddiqui et al.]")
  common.add_output_args(p)
  common.add_mesh_arg(p)
  common.add_distributed_args(p)
  p.set_defaults(run=run)


def run(args) -> dict:
  from jaxprune.depth import depth_prune, parse_recovery, removal_count
  from jaxprune.depth._pipeline import check_near
  from jaxprune.depth._metrics import check_metric
  from jaxprune.depth._stages import check_unit
  from jaxprune.errors import JaxpruneError
  from jaxprune.io._checkpoint import save_checkpoint
  from jaxprune.prune._job import check_out

  check_metric(args.metric)  # every check that needs no model comes before loading one
  check_unit(args.unit)
  fit = dict(damp=args.damp, fit=args.recover_fit, init=args.recover_init, steps=args.recover_steps,
             lr=args.recover_lr)
  parse_recovery(args.recover, **fit)
  if args.samples < 1:
    raise JaxpruneError(f"--samples must be at least 1, got {args.samples}")
  if args.near is not None and args.near < 1:
    raise JaxpruneError(f"--near must be at least 1, got {args.near}")
  check_out(args.out, args.overwrite)
  model = common.load(args.model, dtype=args.dtype)
  config = model.config
  recovery = parse_recovery(args.recover, width=config.hidden_size, **fit)
  k = removal_count(config, args.unit, remove=args.remove, fraction=args.fraction)
  if args.metric == "shapley_near":
    check_near(config, args.unit, remove=k, iterative=args.iterative, near=args.near)
  calib = common.windows(model, args.calib, seqlen=args.seqlen, role="calib", nsamples=args.nsamples,
                         seed=args.seed)
  evals = common.eval_windows(args, model, args.eval) if args.eval else None  # bad eval data fails before work
  mesh = common.mesh(args)
  dense = None
  if evals is not None and args.eval_dense:
    dense = common.evaluate(args, model.params, config, evals, mesh=mesh, desc="eval dense")
  common.log(f"depth: removing {k} {args.unit} units by {args.metric}"
             f"{' (iterative)' if args.iterative else ''}, recovery {recovery}"
             f"{f' trained by {recovery.fit}' if recovery.learned else ''}")
  res = depth_prune(model.params, calib.tokens, config=config, metric=args.metric, unit=args.unit, remove=k,
                    iterative=args.iterative, recovery=recovery, samples=args.samples, seed=args.seed,
                    near=args.near, batch_size=args.batch_size, mesh=mesh)
  record = {**res.to_json(), "model": args.model, "iterative": args.iterative, "calib": calib.source,
            "calib_sha256": calib.sha256, "nsamples": int(calib.tokens.shape[0]), "seqlen": args.seqlen,
            "seed": args.seed, "sublayers": [list(m) for m in res.config.sublayers]}
  block = None
  if evals is not None:
    block = common.evaluate(args, res.params, res.config, evals, mesh=mesh)
    record["eval"] = block
  metadata = dict(model.metadata)
  metadata["depth"] = metadata.get("depth", []) + [record] if isinstance(metadata.get("depth"), list) else [record]
  tokenizer = model.tokenizer if model.tokenizer_path is not None else None
  save_checkpoint(args.out, res.config, res.params, metadata=metadata, tokenizer=tokenizer,
                  overwrite=args.overwrite)
  common.log(f"wrote checkpoint {args.out}")
  summary = (f"removed {', '.join(record['removed']) or 'nothing'}: {res.params_before} -> {res.params_after} "
             "params")
  if block is not None:
    summary += f"; perplexity {block['perplexity']:.4f} on {block['data']}"
    if dense is not None:
      summary += f" (dense {dense['perplexity']:.4f})"
  common.say(args, summary)
  return {**{k: v for k, v in record.items() if k != "eval"}, **common.eval_result(block, dense)}
