"""Perplexity-eval speed: jaxprune (jit-compiled JAX) against transformers' eager PyTorch, same windows, same CPU.

Each framework runs in its own process (so each peak memory is its own), one after the other, on the settings of
``config.json`` (command-line options override them):

  python experiments/eval_speed/bench.py                  # -> result.json, table.md
  python experiments/eval_speed/bench.py --only-report    # table.md from result.json
  python experiments/eval_speed/bench.py --baseline REV   # also jaxprune at git revision REV, same run

Tokens/s counts every evaluated token; the first batch (JAX compilation, PyTorch warm-up) is timed separately.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import command, machine, peak_rss_gb, run_worker, write_json  # noqa: E402


def _windows(model_name: str, data: str, n: int, seqlen: int):
  import jaxprune as jp

  model = jp.load_model(model_name)
  return jp.load_windows(data, tokenizer=model.tokenizer, seqlen=seqlen, role="eval", max_windows=n).tokens


def _jax(model_name: str, windows, batch: int, threads: int) -> dict:
  import jaxprune as jp

  model = jp.load_model(model_name)
  first = time.perf_counter()
  jp.perplexity(model.params, windows[:batch], config=model.config, batch_size=batch, progress=False)
  warmup = time.perf_counter() - first
  result = jp.perplexity(model.params, windows, config=model.config, batch_size=batch, progress=False)
  return {"perplexity": result.perplexity, "seconds": result.seconds, "warmup_seconds": warmup}


def _torch(model_name: str, windows, batch: int, threads: int) -> dict:
  import numpy as np
  import torch
  import transformers

  from jaxprune.io import embedded_path

  torch.set_num_threads(threads)
  path = embedded_path(model_name)
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

  if args.library:  # another version of jaxprune (a git worktree) before this checkout's
    sys.path.insert(0, args.library)

  windows = np.load(args.tokens)
  fn = {"jax": _jax, "torch": _torch}[args.framework]
  out = fn(args.model, windows, args.batch_size, args.threads)
  out.update(tokens=int(windows.size), tokens_per_second=windows.size / out["seconds"], peak_rss_gb=peak_rss_gb())
  print(json.dumps(out))


def _baseline(revision: str, common: list[str]) -> dict:
  """The JAX worker run with jaxprune as of git ``revision`` (a temporary worktree, removed afterwards)."""
  import subprocess
  import tempfile

  root = Path(__file__).resolve().parents[2]
  with tempfile.TemporaryDirectory() as tmp:
    tree = Path(tmp) / "baseline"
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tree), revision], check=True,
                   capture_output=True)
    try:
      return run_worker(Path(__file__), "--framework", "jax", "--library", str(tree), *common)
    finally:
      subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], check=False)


def table(result: dict) -> str:
  """Markdown table: tokens/s, first batch, peak memory and perplexity of both frameworks, and their ratio."""
  jax_, torch_ = result["jax"], result["torch"]
  rows = ["| | tokens/s | first batch (s) | peak RSS (GB) | perplexity |", "|---|---|---|---|---|"]
  for name, r in (("jaxprune (JAX, jit)", jax_), ("transformers (PyTorch, eager)", torch_)):
    rows.append(f"| {name} | {r['tokens_per_second']:.1f} | {r['warmup_seconds']:.1f} | {r['peak_rss_gb']:.2f} | "
                f"{r['perplexity']:.6f} |")
  rows.append(f"| ratio JAX / PyTorch | {result['speedup_jax_over_torch']:.2f}× | | "
              f"{jax_['peak_rss_gb'] / torch_['peak_rss_gb']:.2f}× | |")
  if "baseline" in result:
    b = result["baseline"]
    rows.append(f"| jaxprune at {b['revision']} | {b['tokens_per_second']:.1f} | {b['warmup_seconds']:.1f} | "
                f"{b['peak_rss_gb']:.2f} | {b['perplexity']:.6f} |")
    rows.append(f"| ratio this / {b['revision']} | {result['speedup_over_baseline']:.2f}× | | | |")
  return "\n".join(rows) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", type=Path, default=Path(__file__).with_name("config.json"))
  p.add_argument("--windows", type=int, help="evaluation windows [config]")
  p.add_argument("--seqlen", type=int, help="tokens per window [config]")
  p.add_argument("--batch-size", type=int, help="windows per batch [config]")
  p.add_argument("--threads", type=int, help="PyTorch intra-op threads; XLA uses all cores [config]")
  p.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for result.json and table.md")
  p.add_argument("--only-report", action="store_true", help="rewrite table.md from result.json")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--framework", help=argparse.SUPPRESS)
  p.add_argument("--tokens", help=argparse.SUPPRESS)
  p.add_argument("--model", help=argparse.SUPPRESS)
  p.add_argument("--library", help=argparse.SUPPRESS)
  p.add_argument("--baseline", help="also time jaxprune at this git revision (checked out in a temporary worktree)")
  args = p.parse_args()
  if args.worker:
    return worker(args)
  if args.only_report:
    (args.out / "table.md").write_text(table(json.loads((args.out / "result.json").read_text())))
    return
  import numpy as np

  cfg = json.loads(args.config.read_text())
  windows, seqlen = args.windows or cfg["windows"], args.seqlen or cfg["seqlen"]
  batch, threads = args.batch_size or cfg["batch_size"], args.threads or cfg["torch_threads"]
  args.out.mkdir(parents=True, exist_ok=True)
  tokens = args.out / "eval.tokens.npy"
  np.save(tokens, _windows(cfg["model"], cfg["data"], windows, seqlen))
  common = ["--tokens", str(tokens), "--batch-size", str(batch), "--threads", str(threads), "--model", cfg["model"]]
  runs = {fw: run_worker(Path(__file__), "--framework", fw, *common) for fw in ("jax", "torch")}
  if args.baseline:
    runs["baseline"] = _baseline(args.baseline, common)
  tokens.unlink()
  result = {
      "command": command(Path(__file__)), "machine": machine(), "config": cfg, "windows": windows, "seqlen": seqlen,
      "batch_size": batch, "torch_threads": threads, "data": f"{cfg['data']} (bundled)", "jax": runs["jax"],
      "torch": runs["torch"],
      "speedup_jax_over_torch": runs["jax"]["tokens_per_second"] / runs["torch"]["tokens_per_second"],
  }
  if args.baseline:
    result["baseline"] = {"revision": args.baseline, **runs["baseline"]}
    result["speedup_over_baseline"] = runs["jax"]["tokens_per_second"] / runs["baseline"]["tokens_per_second"]
  write_json(args.out / "result.json", result)
  (args.out / "table.md").write_text(table(result))
  print(table(result))


if __name__ == "__main__":
  main()
