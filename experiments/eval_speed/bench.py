"""Perplexity-eval speed: jaxprune (jit-compiled JAX) against transformers' eager PyTorch, same windows, same CPU.

Each framework runs in its own process (so each peak memory is its own), one after the other:

  python experiments/eval_speed/bench.py --windows 32 --seqlen 512 --batch-size 8 \
      --out experiments/eval_speed/result.json

Tokens/s counts every evaluated token; the first batch (JAX compilation, PyTorch warm-up) is timed separately.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import machine, peak_rss_gb, run_worker, write_json  # noqa: E402


def _windows(n: int, seqlen: int):
  from jaxprune.data import load_windows
  from jaxprune.io._load import load_model

  model = load_model("smollm2-135m")
  return load_windows("austen", tokenizer=model.tokenizer, seqlen=seqlen, role="eval", max_windows=n).tokens


def _jax(windows, batch: int, threads: int) -> dict:
  from jaxprune._evaluate import perplexity
  from jaxprune.io._load import load_model

  model = load_model("smollm2-135m")
  first = time.perf_counter()
  perplexity(model.params, windows[:batch], config=model.config, batch_size=batch, progress=False)
  warmup = time.perf_counter() - first
  result = perplexity(model.params, windows, config=model.config, batch_size=batch, progress=False)
  return {"perplexity": result.perplexity, "seconds": result.seconds, "warmup_seconds": warmup}


def _torch(windows, batch: int, threads: int) -> dict:
  import numpy as np
  import torch
  import transformers

  from jaxprune.io._load import embedded_path

  torch.set_num_threads(threads)
  path = embedded_path("smollm2-135m")
  model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()

  def losses(chunk):
    ids = torch.tensor(chunk, dtype=torch.long)
    with torch.no_grad():
      logits = model(ids).logits[:, :-1].float()
      return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

  first = time.perf_counter()
  losses(windows[:batch])
  warmup = time.perf_counter() - first
  start = time.perf_counter()
  per_window = torch.cat([losses(windows[i:i + batch]) for i in range(0, len(windows), batch)])
  seconds = time.perf_counter() - start
  return {"perplexity": float(np.exp(per_window.double().mean().item())), "seconds": seconds,
          "warmup_seconds": warmup}


def worker(args) -> None:
  import numpy as np

  windows = np.load(args.tokens)
  fn = {"jax": _jax, "torch": _torch}[args.framework]
  out = fn(windows, args.batch_size, args.threads)
  out.update(tokens=int(windows.size), tokens_per_second=windows.size / out["seconds"], peak_rss_gb=peak_rss_gb())
  print(json.dumps(out))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--windows", type=int, default=32)
  p.add_argument("--seqlen", type=int, default=512)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (XLA uses all cores)")
  p.add_argument("--out", type=Path, default=Path(__file__).with_name("result.json"))
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--framework", help=argparse.SUPPRESS)
  p.add_argument("--tokens", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args)
  import numpy as np

  tokens = args.out.with_suffix(".tokens.npy")
  np.save(tokens, _windows(args.windows, args.seqlen))
  common = ["--tokens", str(tokens), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
  runs = {fw: run_worker(Path(__file__), "--framework", fw, *common) for fw in ("jax", "torch")}
  tokens.unlink()
  result = {
      "command": " ".join(["python", "experiments/eval_speed/bench.py", *sys.argv[1:]]),
      "machine": machine(), "windows": args.windows, "seqlen": args.seqlen, "batch_size": args.batch_size,
      "data": "austen (bundled)", "jax": runs["jax"], "torch": runs["torch"],
      "speedup_jax_over_torch": runs["jax"]["tokens_per_second"] / runs["torch"]["tokens_per_second"],
  }
  write_json(args.out, result)


if __name__ == "__main__":
  main()
