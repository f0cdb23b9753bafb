"""``jaxprune convert``: a Hugging Face directory, hub name or GGUF file -> a jaxprune (Orbax) checkpoint."""
from __future__ import annotations

from pathlib import Path

from jaxprune._commands import common


def add_parser(sub) -> None:
  p = sub.add_parser("convert", help="convert HF/GGUF weights to a jaxprune checkpoint")
  common.add_model_arg(p)
  p.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
  p.add_argument("--overwrite", action="store_true", help="replace an existing jaxprune checkpoint")
  p.set_defaults(run=run)


def run(args) -> dict:
  from jaxprune.io._checkpoint import save_checkpoint

  model = common.load(args.model)
  tokenizer = model.tokenizer if model.tokenizer_path is not None else None
  meta = {**model.metadata, "converted_from": args.model}
  save_checkpoint(args.out, model.config, model.params, masks=model.masks, metadata=meta, tokenizer=tokenizer,
                  overwrite=args.overwrite)
  common.log(f"wrote checkpoint {args.out}")
  return {"out": str(args.out)}
