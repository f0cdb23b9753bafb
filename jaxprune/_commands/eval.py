"""``jaxprune eval``: perplexity of a model on token windows."""
from __future__ import annotations

from jaxprune._commands import common


def add_parser(sub) -> None:
  p = sub.add_parser("eval", help="perplexity of a model (SparseGPT/Wanda protocol)")
  common.add_model_arg(p)
  common.add_dtype_arg(p)
  common.add_eval_args(p, data_flag="--data")
  common.add_batch_arg(p)
  common.add_stream_arg(p)
  common.add_json_arg(p)
  common.add_mesh_arg(p)
  common.add_distributed_args(p)
  p.set_defaults(run=run)


def run(args) -> dict:
  model = common.load(args.model, dtype=args.dtype, stream=args.stream)
  data = common.eval_windows(args, model, args.data)
  block = common.evaluate(args, model.params, model.config, data, mesh=common.mesh(args))
  common.say(args, f"perplexity {block['perplexity']:.4f} on {data.source} ({block['windows']} windows x "
                   f"{block['seqlen']} tokens)")
  return common.with_io_seconds(args, common.eval_result(block))
