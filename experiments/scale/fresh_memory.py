"""Reading a 7B block from the page cache into memory new to the process against memory written before: why a
pass reads a block's weights into one kept buffer and maps its new buffers itself
(``jaxprune._memory.host_buffer``), and what ``JAXPRUNE_RETAIN_MEMORY=1`` is for.

    python experiments/scale/fresh_memory.py [--work DIR]   # -> fresh_memory.json (needs stream7b.py's model)

For blocks 3 to 8 of the LLaMA-2-7B-shaped model written by ``stream7b.py``, after reading the block's bytes once
(into the page cache), 3 s apart (the time a freed page takes to go back to the host on a VM that reports free
pages), GB/s of ``os.preadv`` per block into:

- ``numpy``: new ``np.empty`` buffers (NumPy asks the kernel for transparent huge pages from 4 MiB up);
- ``mapped``: new buffers of ``host_buffer`` (an anonymous memory map each, no huge-page request);
- ``kept``: buffers kept from the block before.

Then the seconds of the whole block read into the kernel layout, as a streamed pass reads it now
(``SafetensorsFiles.get_transient`` into one kept buffer, then ``transposed``) and as it did before
(``np.empty`` buffers, then ``np.ascontiguousarray`` of the transposed view).
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
from jaxprune._memory import host_buffer  # noqa: E402
from jaxprune.io._stream import SafetensorsFiles  # noqa: E402
from jaxprune.models._convert import transposed  # noqa: E402


def _read_into(files: SafetensorsFiles, names: list[str], buffer) -> float:
  start = time.perf_counter()
  held = []
  for n in names:
    file, offset, length = files.where(n)
    out = buffer(n, length)
    with open(file, "rb") as f:
      os.preadv(f.fileno(), [memoryview(out)], offset)
    held.append(out)
  return time.perf_counter() - start


def _block_seconds(names: list[str], read_kernel, convert, read_other) -> float:
  start = time.perf_counter()
  held = [convert(read_kernel(n)) if n.endswith("proj.weight") else read_other(n) for n in names]
  del held
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--work", type=Path, default=Path("/tmp/jaxprune-7b"))
  args = parser.parse_args()
  files = SafetensorsFiles(sorted((args.work / "llama2-7b-shaped").glob("*.safetensors")))
  kept: dict[str, np.ndarray] = {}

  def keep(name, length):
    key = name.split(".", 3)[-1]
    return kept.setdefault(key, np.empty(length, np.uint8))

  def old_get(name):
    file, offset, length = files.where(name)
    out = np.empty(length, np.uint8)
    with open(file, "rb") as f:
      os.preadv(f.fileno(), [memoryview(out)], offset)
    return out.view(_dtype(files, name)).reshape(files.shape(name))

  rows = []
  for i in range(3, 9):
    names = [n for n in files.dtypes if f"layers.{i}." in n]
    nbytes = sum(files.where(n)[2] for n in names)
    for n in names:
      files.get(n)  # into the page cache
    row = {"block": i, "gb": nbytes / 1e9}
    for kind, buffer in (("numpy", lambda n, length: np.empty(length, np.uint8)),
                         ("mapped", lambda n, length: host_buffer(length)), ("kept", keep)):
      if kind == "kept" and not kept:
        _read_into(files, names, keep)  # the buffers written once
      time.sleep(3)
      row[f"{kind}_gb_per_s"] = nbytes / _read_into(files, names, buffer) / 1e9
    time.sleep(3)
    row["block_now_s"] = _block_seconds(names, files.get_transient, transposed, files.get)
    time.sleep(3)
    row["block_before_s"] = _block_seconds(names, old_get, lambda w: np.ascontiguousarray(w.T), old_get)
    rows.append(row)
    print(row, flush=True)
  write_json(Path(__file__).with_name("fresh_memory.json"), {"command": command(Path(__file__)), "machine": machine(),
                                                            "blocks": rows})


def _dtype(files: SafetensorsFiles, name: str) -> np.dtype:
  from jaxprune.io._stream import _SAFETENSORS_DTYPES

  return _SAFETENSORS_DTYPES[files.dtypes[name]]


if __name__ == "__main__":
  main()
