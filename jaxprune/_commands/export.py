"""``jaxprune export``: any model (typically a pruned jaxprune checkpoint) -> a Hugging Face directory."""
from __future__ import annotations

from pathlib import Path

from jaxprune._commands import common


def add_parser(sub) -> None:
  p = sub.add_parser("export", help="export a model to a Hugging Face directory (config, safetensors, tokenizer)")
  common.add_model_arg(p)
  p.add_argument("--out", type=Path, required=True, help="directory to create (must not exist or be empty)")
  p.set_defaults(run=run)


def run(args) -> dict:
  from jaxprune.io._hf import save_hf_dir

  model = common.load(args.model)
  tokenizer = model.tokenizer if model.tokenizer_path is not None else None
  config, params = model.config, model.params
  if config.sublayers:  # removed sublayers become zero weights (and output biases) a HF model computes exactly
    from jaxprune.depth import hf_compatible

    config, params = hf_compatible(config, params)
  save_hf_dir(args.out, config, params, tokenizer)
  common.log(f"wrote Hugging Face directory {args.out}")
  return {"out": str(args.out)}
