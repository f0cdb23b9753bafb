"""Prunes a LLaMA-2-7B-shaped model (random bfloat16 weights, 13.5 GB) on a machine whose memory it would not fit
in as float32, streaming its blocks from disk: peak resident memory, seconds, and their split into reading,
computing and writing, against the disk's own sequential bandwidth measured in the same run.

    python experiments/scale/stream7b.py [--work DIR] [--baseline REF] [--retain-memory]  # -> stream7b.json, .md

Steps, each a fresh ``jaxprune`` process whose peak RSS is read from ``wait4``:
  1. the model: a Hugging Face directory with LLaMA-2-7B's config and random N(0, 0.02) bfloat16 weights, written
     block by block (kept in ``--work`` for later runs);
  2. ``prune --stream --method wanda`` of every block on ``--nsamples`` x ``--seqlen`` calibration tokens, with
     the pruned perplexity on ``--eval-windows`` windows;
  3. ``prune --stream --method sparsegpt --blocks 0:2``: SparseGPT on the first two blocks only, the others copied;
  4. ``eval --stream`` of the Wanda checkpoint;
  5. ``dd``: sequential write and read of a 4 GiB file, the disk's own bandwidth (direct I/O), a write through
     the page cache flushed with fsync, and a direct read of the model's own files.
With ``--baseline REF`` (a git commit), steps 2 and 3 also run with the code of ``REF`` (checked out into a
temporary worktree and put first on ``PYTHONPATH``), each right after the same step with this checkout's code;
with ``--retain-memory``, steps 2 to 4 also run with ``JAXPRUNE_RETAIN_MEMORY=1`` (``jaxprune/_memory.py``).

Reading and writing run beside the computation (the next block read ahead, each pruned block written behind): a
step's ``read`` and ``write`` seconds are those its main thread waited for them, ``read_ahead`` and
``write_behind`` those of the background threads.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import command, machine, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
             "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def write_model(out: Path, config: dict, seed: int = 0) -> float:
  """A Hugging Face directory with ``config`` and random bfloat16 weights, one safetensors file per block."""
  import ml_dtypes
  from safetensors.numpy import save_file

  if (out / "model.safetensors.index.json").is_file():
    return 0.0
  start = time.perf_counter()
  tmp = out.with_name(out.name + ".tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  h, f, v, n = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]

  def normal(*shape):
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

  def ones(*shape):
    return np.ones(shape, ml_dtypes.bfloat16)

  parts = [{"model.embed_tokens.weight": lambda: normal(v, h), "model.norm.weight": lambda: ones(h),
            "lm_head.weight": lambda: normal(v, h)}]
  for i in range(n):
    p = f"model.layers.{i}."
    parts.append({p + "self_attn.q_proj.weight": lambda: normal(h, h),
                  p + "self_attn.k_proj.weight": lambda: normal(h, h),
                  p + "self_attn.v_proj.weight": lambda: normal(h, h),
                  p + "self_attn.o_proj.weight": lambda: normal(h, h),
                  p + "mlp.gate_proj.weight": lambda: normal(f, h), p + "mlp.up_proj.weight": lambda: normal(f, h),
                  p + "mlp.down_proj.weight": lambda: normal(h, f), p + "input_layernorm.weight": lambda: ones(h),
                  p + "post_attention_layernorm.weight": lambda: ones(h)})
  weight_map, total = {}, 0
  for k, part in enumerate(parts):
    name = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
    tensors = {key: make() for key, make in part.items()}
    save_file(tensors, str(tmp / name), metadata={"format": "pt"})
    total += sum(t.nbytes for t in tensors.values())
    weight_map.update(dict.fromkeys(tensors, name))
    print(f"  wrote {name}", flush=True)
  (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}))
  (tmp / "config.json").write_text(json.dumps(config, indent=1))
  tmp.rename(out)
  return time.perf_counter() - start


def run(argv: list[str], code: Path | None = None, env: dict | None = None) -> dict:
  """``python -m jaxprune ARGV --json F`` in a fresh process (with the package from the checkout ``code`` when
  given, and ``env`` added to the environment): its JSON, wall seconds and peak RSS (GB)."""
  out = Path(argv[argv.index("--out") + 1] if "--out" in argv else "/tmp/jaxprune-stream-eval") .with_suffix(".json")
  env = {**os.environ, **(env or {}), **({"PYTHONPATH": str(code)} if code is not None else {})}
  start = time.perf_counter()
  # ``-m`` puts the working directory first on the path: the checkout's own directory when ``code`` is given
  proc = subprocess.Popen([sys.executable, "-m", "jaxprune", *argv, "--json", str(out)], env=env, cwd=code)
  _, status, usage = os.wait4(proc.pid, 0)
  seconds = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"jaxprune {' '.join(argv)} failed")
  doc = json.loads(out.read_text())
  return {"argv": argv, "seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 3),
          "result": doc}


def disk_bandwidth(work: Path, model: Path, gib: int = 4) -> dict:
  """Sequential write and read of ``gib`` GiB (``dd``, 16 MiB blocks), in GB/s: with direct I/O (the device's
  own rate), and written through the page cache and flushed to disk before ``dd`` returns (``conv=fsync``), as a
  program that writes files and syncs them does; and the model's own safetensors files read with direct I/O
  (``read_model``: the bytes the steps read, where the freshly written file may come back from a cache of the
  storage)."""
  file = work / "dd.bin"
  out = {}
  for kind, args in (("write", ["if=/dev/zero", f"of={file}", "oflag=direct"]),
                     ("buffered_fsync_write", ["if=/dev/zero", f"of={file}", "conv=fsync"]),
                     ("read", [f"if={file}", "of=/dev/null", "iflag=direct"])):
    start = time.perf_counter()
    subprocess.run(["dd", *args, "bs=16M", f"count={gib * 64}", "status=none"], check=True)
    out[f"{kind}_gb_per_s"] = round(gib * 2**30 / 1e9 / (time.perf_counter() - start), 3)
  file.unlink()
  files = sorted(model.glob("*.safetensors"))
  start = time.perf_counter()
  for f in files:
    subprocess.run(["dd", f"if={f}", "of=/dev/null", "iflag=direct", "bs=16M", "status=none"], check=True)
  out["read_model_gb_per_s"] = round(sum(f.stat().st_size for f in files) / 1e9 / (time.perf_counter() - start), 3)
  return out


def dir_gb(path: Path) -> float:
  """GB of the files under ``path`` (each hard link counted once)."""
  seen, total = set(), 0
  for f in path.rglob("*"):
    st = f.stat()
    if f.is_file() and (st.st_dev, st.st_ino) not in seen:
      seen.add((st.st_dev, st.st_ino))
      total += st.st_size
  return round(total / 1e9, 2)


def split(step: dict) -> dict:
  """Seconds of a step split into reading, writing and the rest (computing, compiling, start-up), as its main
  thread spent them; beside them, the seconds of the background reading and writing."""
  io = step["result"].get("io_seconds", {})
  read, write = io.get("read", 0.0), io.get("write", 0.0)
  return {"seconds": step["seconds"], "read": read, "write": write,
          "compute_and_rest": round(step["seconds"] - read - write, 1),
          "read_ahead": io.get("read_ahead", 0.0), "write_behind": io.get("write_behind", 0.0)}


def git(*args: str, check: bool = True) -> None:
  subprocess.run(["git", "-C", str(HERE.parents[1]), *args], check=check, capture_output=True)


def worktree(ref: str, where: Path) -> Path:
  """A checkout of commit ``ref`` of this repository at ``where`` (replaced if there)."""
  git("worktree", "remove", "--force", str(where), check=False)
  git("worktree", "add", "--detach", str(where), ref)
  return where


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--work", type=Path, default=Path("/tmp/jaxprune-7b"), help="model and checkpoints")
  parser.add_argument("--nsamples", type=int, default=2)
  parser.add_argument("--seqlen", type=int, default=128)
  parser.add_argument("--eval-windows", type=int, default=2)
  parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
  parser.add_argument("--baseline", help="a git commit whose code also runs the two prune steps, for comparison")
  parser.add_argument("--retain-memory", action="store_true",
                      help="the prune steps and the eval also with JAXPRUNE_RETAIN_MEMORY=1 (jaxprune/_memory.py)")
  parser.add_argument("--only-report", action="store_true", help="stream7b.md from stream7b.json")
  args = parser.parse_args()
  if args.only_report:
    report(json.loads((HERE / "stream7b.json").read_text()))
    return
  work = args.work
  work.mkdir(parents=True, exist_ok=True)
  model = work / "llama2-7b-shaped"
  generated = write_model(model, LLAMA2_7B)
  rng = np.random.default_rng(1)
  np.save(work / "calib.npy", rng.integers(0, 32000, (args.nsamples, args.seqlen)).astype(np.int32))
  np.save(work / "eval.npy", rng.integers(0, 32000, (args.eval_windows, args.seqlen)).astype(np.int32))
  common = ["--calib", str(work / "calib.npy"), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
  steps, written = {}, {}
  codes = {"": (None, None)}  # row suffix -> (checkout, environment)
  baseline = work / "baseline-code"
  if args.retain_memory:
    codes["_retain_memory"] = (None, {"JAXPRUNE_RETAIN_MEMORY": "1"})
  if args.baseline:
    codes[f"_at_{args.baseline}"] = (worktree(args.baseline, baseline), None)
  prunes = {"wanda": ["--method", "wanda", *common, "--eval", str(work / "eval.npy")],
            "sparsegpt_blocks_0_2": ["--method", "sparsegpt", "--blocks", "0:2", *common]}
  for name, options in prunes.items():
    for suffix, (code, env) in codes.items():
      out = work / (name + suffix)
      shutil.rmtree(out, ignore_errors=True)
      shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
      steps[name + suffix] = run(["prune", "--model", str(model), "--stream", "--sparsity", "0.5", *options,
                                  "--out", str(out)], code, env)
      print(json.dumps({k: v for k, v in steps[name + suffix].items() if k != "result"}), flush=True)
      written[name + suffix] = dir_gb(out)
      if name == "wanda" and code is None:
        steps["eval_wanda" + suffix] = run(["eval", "--model", str(out), "--stream", "--data", str(work / "eval.npy")],
                                           env=env)
      if not args.keep:
        shutil.rmtree(out)
  if args.baseline:
    git("worktree", "remove", "--force", str(baseline))
  disk = disk_bandwidth(work, model)
  size_gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
  result = {"command": command(Path(__file__)), "machine": machine(), "model_gb": round(size_gb, 2),
            "generate_seconds": round(generated, 1), "calibration_tokens": args.nsamples * args.seqlen,
            "eval_tokens": args.eval_windows * args.seqlen, "disk": disk,
            "steps": {k: {"peak_rss_gb": v["peak_rss_gb"], **split(v),
                          **{key: v["result"].get(key) for key in ("perplexity", "sparsity", "prune_seconds")}}
                      for k, v in steps.items()}}
  for k, v in result["steps"].items():
    # Writes: the checkpoint's bytes (each block is written once, into the resume directory, and hard-linked into
    # the checkpoint).
    if k in written:
      v["written_gb"] = written[k]
      v["write_over_direct"] = round(v["write"] / (written[k] / disk["write_gb_per_s"]), 2)
      v["write_over_buffered_fsync"] = round(v["write"] / (written[k] / disk["buffered_fsync_write_gb_per_s"]), 2)
      v["behind_over_direct"] = round(v["write_behind"] / (written[k] / disk["write_gb_per_s"]), 2)
      v["behind_over_buffered_fsync"] = round(v["write_behind"] / (written[k] / disk["buffered_fsync_write_gb_per_s"]),
                                              2)
  write_json(HERE / "stream7b.json", result)
  report(result)


def read_gb(result: dict, step: str) -> float:
  """GB a step reads: the model once (the Wanda step also reads its checkpoint back for ``--eval``; the eval step
  reads that checkpoint only)."""
  wanda = result["steps"].get(step.replace("eval_", "", 1), {}).get("written_gb", 0.0)
  if step.startswith("eval_"):
    return wanda
  return result["model_gb"] + (wanda if step.startswith("wanda") else 0.0)


def report(result: dict) -> None:
  """``stream7b.md`` from ``result``: each step's seconds, split, and its reads and writes against ``dd``."""
  disk = result["disk"]
  lines = ["| step | peak RSS GB | seconds | read s (GB; × dd of a fresh file, × dd of the model's files) "
           "| write s (GB; × direct dd, × dd with fsync) | compute and rest s | read ahead s "
           "| write behind s (× direct dd, × dd with fsync) | perplexity |",
           "|---|---|---|---|---|---|---|---|---|"]
  for k, v in result["steps"].items():
    gb = read_gb(result, k)
    read = (f" ({gb:.2f} GB; {v['read'] / (gb / disk['read_gb_per_s']):.2f}×, "
            f"{v['read'] / (gb / disk['read_model_gb_per_s']):.2f}×)")
    ratio = (f" ({v['written_gb']} GB; {v['write_over_direct']}×, {v['write_over_buffered_fsync']}×)"
             if "written_gb" in v else "")
    behind = (f" ({v['behind_over_direct']}×, {v['behind_over_buffered_fsync']}×)" if v.get("write_behind")
              and "behind_over_direct" in v else "")
    lines.append(f"| {k} | {v['peak_rss_gb']:.2f} | {v['seconds']:.0f} | {v['read']:.0f}{read} "
                 f"| {v['write']:.0f}{ratio} | {v['compute_and_rest']:.0f} | {v['read_ahead']:.0f} "
                 f"| {v['write_behind']:.0f}{behind} | {v.get('perplexity') or ''} |")
  lines.append(f"\nModel {result['model_gb']:.2f} GB on disk; disk (dd, same run): write {disk['write_gb_per_s']} GB/s "
               f"direct, {disk['buffered_fsync_write_gb_per_s']} GB/s through the page cache with fsync; read "
               f"{disk['read_gb_per_s']} GB/s direct (the model's own files: {disk['read_model_gb_per_s']} GB/s).")
  (HERE / "stream7b.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
