"""How much a last-bit change in the attention moves a pruned perplexity: one quality case, pruned and evaluated
with jaxprune's previous attention kernel (full score matrix, KV heads repeated, ``jax.nn.softmax``) in place of
the chunked one (``jaxprune.models._layers.dot_attention``). Both compute the same function; the dense perplexity
agrees to 7 digits.

  python experiments/quality/rounding.py --case sparsegpt:u60 --out experiments/quality/rounding.json

Settings as ``run.py`` (``config.json``); compare with that case in ``result.json`` (the chunked kernel).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import machine, parse_case, write_json  # noqa: E402


def full_attention(q, k, v, mask):
  """The previous kernel: ``(b, t, h, d)`` queries, ``(b, t, kv, d)`` keys/values, ``(b, 1, t, t)`` mask."""
  import jax
  import jax.numpy as jnp

  b, t, h, d = q.shape
  groups = h // k.shape[2]
  if groups > 1:
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(d)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, h * d)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--case", default="sparsegpt:u60", help="METHOD:uNN or METHOD:N:M")
  p.add_argument("--config", type=Path, default=Path(__file__).with_name("config.json"))
  p.add_argument("--out", type=Path, default=Path(__file__).with_name("rounding.json"))
  args = p.parse_args()
  for name in ("jaxprune.models._llama", "jaxprune.models._opt"):
    importlib.import_module(name).dot_attention = full_attention

  from jaxprune.data import load_windows
  from jaxprune._evaluate import perplexity
  from jaxprune.io._load import load_model
  from jaxprune.prune._job import prune
  from jaxprune.prune._sequential import PruneSpec

  cfg = json.loads(args.config.read_text())
  model = load_model(cfg["model"])
  evals = load_windows(cfg["eval"], tokenizer=model.tokenizer, seqlen=cfg["seqlen"], role="eval",
                       max_windows=cfg["eval_windows"])
  calib = load_windows(cfg["calib"], tokenizer=model.tokenizer, seqlen=cfg["seqlen"], role="calib",
                       nsamples=cfg["nsamples"], seed=cfg["seed"])
  method, pattern = parse_case(args.case)
  dense = perplexity(model.params, evals.tokens, config=model.config, progress=False).perplexity
  outcome = prune(model.params, model.config, PruneSpec(method, pattern), calib.tokens, progress=False)
  pruned = perplexity(outcome.params, evals.tokens, config=model.config, progress=False).perplexity
  write_json(args.out, {"command": "python experiments/quality/rounding.py " + " ".join(sys.argv[1:]),
                        "machine": machine(), "attention": "full score matrix (previous kernel)", "case": args.case,
                        "dense_perplexity": dense, "perplexity": pruned, "calib_sha256": calib.sha256,
                        "eval_sha256": evals.sha256,
                        "reconstruction_error": sum(r["error"] for r in outcome.metadata["layers"])})


if __name__ == "__main__":
  main()
