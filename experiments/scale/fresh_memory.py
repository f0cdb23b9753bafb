"""Copying a 7B block from the page cache into fresh host memory against memory written before: why a pass
reuses its buffers (``jaxprune.runner._batches.gathered``) and what ``JAXPRUNE_RETAIN_MEMORY=1`` is for.

    python experiments/scale/fresh_memory.py [--work DIR]   # -> fresh_memory.json (needs stream7b.py's model)

For blocks 3 to 8 of the LLaMA-2-7B-shaped model written by ``stream7b.py``: read the block's bytes once (into the
page cache), then copy them with ``os.preadv`` into new NumPy buffers (``SafetensorsFiles.get``) and into buffers
kept from the block before, 3 s apart (the time a freed page takes to go back to the host on a VM that reports
free pages). GB/s per block.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import command, machine, write_json  # noqa: E402
from jaxprune.io._stream import SafetensorsFiles  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--work", type=Path, default=Path("/tmp/jaxprune-7b"))
  args = parser.parse_args()
  files = SafetensorsFiles(sorted((args.work / "llama2-7b-shaped").glob("*.safetensors")))
  kept: dict[str, np.ndarray] = {}
  rows = []
  for i in range(3, 9):
    names = [n for n in files.dtypes if f"layers.{i}." in n]
    nbytes = sum(files.where(n)[2] for n in names)
    for n in names:
      files.get(n)  # into the page cache
    start = time.perf_counter()
    fresh = [files.get(n) for n in names]
    fresh_s = time.perf_counter() - start
    del fresh
    start = time.perf_counter()
    for n in names:
      file, offset, length = files.where(n)
      key = n.split(f"layers.{i}.")[1]
      buffer = kept.setdefault(key, np.empty(length, np.uint8))
      with open(file, "rb") as f:
        os.preadv(f.fileno(), [memoryview(buffer)], offset)
    kept_s = time.perf_counter() - start
    rows.append({"block": i, "gb": nbytes / 1e9, "fresh_gb_per_s": nbytes / fresh_s / 1e9,
                 "kept_gb_per_s": nbytes / kept_s / 1e9})
    print(rows[-1], flush=True)
    time.sleep(3)
  write_json(Path(__file__).with_name("fresh_memory.json"), {"command": command(Path(__file__)), "machine": machine(),
                                                            "blocks": rows})


if __name__ == "__main__":
  main()
