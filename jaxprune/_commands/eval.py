"""``jaxprune eval``: perplexity of a model on token windows."""
from __future__ import annotations

from jaxprune._commands import common


def add_parser(sub) -> None:
  p = sub.add_parser("eval", help="perplexity of a model (SparseGPT/Wanda protocol)")
  common.add_model_arg(p)
  p.add_argument("--data", default=common.DEFAULT_EVAL,
                 help="bundled corpus name, text file, .npy token windows (n, seqlen), or wikitext2/c4/ptb "
                      "(online) [default: %(default)s]")
  p.add_argument("--seqlen", type=int, default=512, help="tokens per window [default: %(default)s]")
  p.add_argument("--max-windows", type=int, default=32,
                 help="evaluate at most this many windows; 0 = all [default: %(default)s]")
  p.add_argument("--batch-size", type=int, default=8, help="windows per batch [default: %(default)s]")
  common.add_json_arg(p)
  p.set_defaults(run=run)


def run(args) -> dict:
  from jaxprune._evaluate import data_mesh, perplexity

  model = common.load(args.model)
  data = common.windows(model, args.data, seqlen=args.seqlen, role="eval", max_windows=args.max_windows or None)
  common.log(f"evaluating {data.tokens.shape[0]} windows x {args.seqlen} tokens of {data.source}")
  result = perplexity(model.params, data.tokens, config=model.config, batch_size=args.batch_size, mesh=data_mesh())
  out = {"model": args.model, "data": data.source, "data_sha256": data.sha256, **result.to_json()}
  common.write_json(args.json, out)
  return out
