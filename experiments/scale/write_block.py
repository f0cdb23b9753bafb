"""Where the seconds of writing pruned blocks go: LLaMA-2-7B blocks (random bfloat16 weights, 0.40 GB each) and
their keep masks as bits (0.03 GB), written one after the other as jaxprune writes them and in other ways, in one
run.

    python experiments/scale/write_block.py [--dir DIR] [--blocks 8]     # -> write_block.json

Each way writes ``--blocks`` blocks in a row into its own directory (under ``--dir``, default: a temporary
directory on the disk holding /tmp), kept until the last is written, as a pass leaves them, and is timed from the
first call to the last return (a write through the page cache returns before the disk has taken all of its
pages; the next ones then wait for them, as in a pass):
  - ``jaxprune``: :func:`jaxprune.io._checkpoint.write_block` (one safetensors file for the params and one for
    the masks, direct I/O through a 16 MiB staging buffer);
  - ``orbax_ocdbt``: :func:`jaxprune.runner._distributed.save_local` (Orbax, OCDBT + zarr3, uncompressed), as
    blocks were written before;
  - ``orbax_zarr3``: Orbax with one zarr3 array per leaf (no OCDBT), uncompressed;
  - ``raw_fsync``: each array's bytes into one file through the page cache, then ``fsync``;
  - ``dd_direct`` / ``dd_fsync``: ``dd`` of as many bytes (16 MiB blocks) with direct I/O, and through the page
    cache with ``conv=fsync``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import command, machine, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
SHAPES = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096), "gate": (11008, 4096),
          "up": (11008, 4096), "down": (4096, 11008)}


def block() -> dict:
  rng = np.random.default_rng(0)
  params = {k: (0.02 * rng.standard_normal(s, np.float32)).astype(ml_dtypes.bfloat16) for k, s in SHAPES.items()}
  masks = {k: np.packbits(rng.random(s) < 0.5, axis=-1) for k, s in SHAPES.items()}
  return {"params": params, "masks": masks}


def orbax_zarr3(path: Path, tree: dict) -> None:
  import orbax.checkpoint as ocp

  from jaxprune.runner._distributed import _this_process_only

  options = _this_process_only()
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True, use_compression=False,
                                        multiprocessing_options=options)
  with ocp.Checkpointer(handler, multiprocessing_options=options) as ckptr:
    ckptr.save(path, args=ocp.args.PyTreeSave(tree))


def raw_fsync(path: Path, tree: dict) -> None:
  path.mkdir()
  for group, arrays in tree.items():
    for name, array in arrays.items():
      with open(path / f"{group}_{name}.bin", "wb") as f:
        f.write(np.ascontiguousarray(array).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())


def dd(path: Path, nbytes: int, flag: str) -> None:
  count = -(-nbytes // (16 << 20))
  subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={count}", flag, "status=none"], check=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dir", type=Path, default=None)
  parser.add_argument("--blocks", type=int, default=8)
  args = parser.parse_args()
  from jaxprune.io._checkpoint import write_block
  from jaxprune.runner._distributed import save_local

  tree = block()
  per_block = sum(a.nbytes for arrays in tree.values() for a in arrays.values())
  nbytes = args.blocks * per_block

  def jaxprune_block(path: Path) -> None:
    for name, arrays in tree.items():
      write_block(path, name, arrays)

  blocks = {"jaxprune": jaxprune_block, "orbax_ocdbt": lambda p: save_local(p, tree),
            "orbax_zarr3": lambda p: orbax_zarr3(p, tree), "raw_fsync": lambda p: raw_fsync(p, tree)}
  def in_a_row(write_one):
    return lambda path: [write_one(path / f"{i:05d}") for i in range(args.blocks)]

  ways = {name: in_a_row(write_one) for name, write_one in blocks.items()}
  ways.update({"dd_direct": lambda p: dd(p, nbytes, "oflag=direct"), "dd_fsync": lambda p: dd(p, nbytes, "conv=fsync")})
  root = Path(tempfile.mkdtemp(prefix="jaxprune-write-", dir=args.dir))
  seconds = {}
  try:
    for name, write in ways.items():
      path = root / name
      if not name.startswith("dd"):
        path.mkdir()
      start = time.perf_counter()
      write(path)
      seconds[name] = round(time.perf_counter() - start, 3)
      shutil.rmtree(path) if path.is_dir() else path.unlink()
      print(f"{name}: {seconds[name]} s ({nbytes / seconds[name] / 1e9:.2f} GB/s)", flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  write_json(HERE / "write_block.json", {
      "command": command(Path(__file__)), "machine": machine(), "blocks": args.blocks,
      "gb": round(nbytes / 1e9, 3), "seconds": seconds,
      "gb_per_s": {k: round(nbytes / v / 1e9, 3) for k, v in seconds.items()},
      "over_dd_direct": {k: round(v / seconds["dd_direct"], 2) for k, v in seconds.items()},
      "over_dd_fsync": {k: round(v / seconds["dd_fsync"], 2) for k, v in seconds.items()}})


if __name__ == "__main__":
  main()
