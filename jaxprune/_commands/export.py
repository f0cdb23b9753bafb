"""``jaxprune export``: any model (typically a pruned jaxprune checkpoint) -> a Hugging Face directory."""
from __future__ import annotations

from pathlib import Path

from jaxprune._commands import common


def add_parser(sub) -> None:
  from jaxprune.io._hf import DEFAULT_SHARD_SIZE, FLOAT_DTYPES

  p = sub.add_parser("export", help="export a model to a Hugging Face directory (config, safetensors, tokenizer, "
                                    "generation config, jaxprune_recipe.json)")
  common.add_model_arg(p)
  p.add_argument("--out", type=Path, required=True, help="directory to create (must not exist or be empty)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing Hugging Face model directory")
  p.add_argument("--dtype", choices=("auto", *FLOAT_DTYPES), default="auto",
                 help="dtype of the stored weights; auto = the dtype the weights are held in when narrower than "
                      "float32, else the dtype the model came in (float32 when unknown, and for quantized GGUF "
                      "files) [default: %(default)s]")
  p.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE,
                 help="larger weights are split into model-*-of-*.safetensors with an index [default: %(default)s]")
  common.add_stream_arg(p)
  common.add_json_arg(p)
  p.set_defaults(run=run)


def run(args) -> dict:
  from jaxprune.io._hf import check_hf_out, parse_size, save_hf_dir
  from jaxprune.io._recipe import build_recipe

  parse_size(args.max_shard_size)  # every check that needs no model comes before loading one
  check_hf_out(args.out, args.overwrite)
  model = common.load(args.model, stream=args.stream)
  tokenizer = model.tokenizer if model.tokenizer_path is not None else None
  config, params = model.config, model.params
  if config.sublayers and args.stream:
    from jaxprune.errors import JaxpruneError

    raise JaxpruneError("--stream: a model with removed sublayers exports without --stream")
  if config.sublayers:  # removed sublayers become zero weights (and output biases) a HF model computes exactly
    from jaxprune.depth import hf_compatible

    config, params = hf_compatible(config, params)
  dtype = args.dtype
  if dtype == "auto":
    dtype = model.dtype if model.dtype != "float32" else model.metadata.get("source_dtype", "float32")
  recipe = build_recipe(model.metadata, config, params, dtype=dtype)
  save_hf_dir(args.out, config, params, tokenizer, dtype=dtype, max_shard_size=args.max_shard_size,
              generation_config=model.metadata.get("generation_config"), recipe=recipe, overwrite=args.overwrite)
  common.say(args, f"wrote Hugging Face directory {args.out} ({dtype}, measured sparsity "
                   f"{recipe['measured_sparsity']:.4f})")
  return {"dtype": dtype, "recipe": recipe}
