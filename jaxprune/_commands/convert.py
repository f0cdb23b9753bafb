"""``jaxprune convert``: a Hugging Face directory, hub name or GGUF file -> a jaxprune (Orbax) checkpoint."""
from __future__ import annotations

from pathlib import Path

from jaxprune._commands import common


def add_parser(sub) -> None:
  p = sub.add_parser("convert", help="convert HF/GGUF weights to a jaxprune checkpoint")
  common.add_model_arg(p)
  common.add_dtype_arg(p)
  p.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
  p.add_argument("--overwrite", action="store_true", help="replace an existing jaxprune checkpoint")
  common.add_json_arg(p)
  p.set_defaults(run=run)


def run(args) -> dict:
  from jaxprune.io._checkpoint import save_checkpoint
  from jaxprune.prune._job import check_out

  check_out(args.out, args.overwrite)  # before loading the model
  model = common.load(args.model, dtype=args.dtype)
  tokenizer = model.tokenizer if model.tokenizer_path is not None else None
  save_checkpoint(args.out, model.config, model.params, masks=model.masks, metadata=dict(model.metadata),
                  tokenizer=tokenizer, overwrite=args.overwrite)
  common.say(args, f"wrote checkpoint {args.out}")
  return {k: v for k, v in model.provenance.items() if k != "generation_config"}
