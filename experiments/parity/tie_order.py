"""Magnitude 2:4: how much of the gap to the reference is the order in which tied magnitudes are pruned?

  python experiments/parity/tie_order.py --out experiments/parity/tie_order.json

The dequantized Q4_1 weights of the embedded model take few distinct values, so two of the four weights of a
group are often equal. jaxprune prunes the lower index first; the reference (the Wanda repository's magnitude
code) takes the two smallest of each group with ``torch.topk(largest=False)``, whose order among equal values
is unspecified. This script builds, for every linear, the 2:4 mask that ``torch.topk`` selects, counts the
groups where it differs from jaxprune's, applies it to jaxprune's model and evaluates the perplexity on the
reference evaluation tokens. If the gap is the tie order, this perplexity equals the reference's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import REFERENCE, machine, write_json  # noqa: E402


def topk_keep(w, n: int, m: int):
  """Keep mask ``(d_out, d_in)`` of ``torch.topk(|W| group, m - n, largest=False)`` pruned per group of ``m``."""
  import numpy as np
  import torch

  groups = torch.from_numpy(np.abs(np.asarray(w, np.float32))).reshape(w.shape[0], -1, m)
  pruned = torch.zeros(groups.shape, dtype=torch.bool)
  pruned.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, True)
  return ~pruned.reshape(w.shape).numpy()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--reference", type=Path, default=REFERENCE)
  p.add_argument("--out", type=Path, default=Path(__file__).with_name("tie_order.json"))
  args = p.parse_args()

  import jax
  import numpy as np
  import torch

  from jaxprune._evaluate import perplexity
  from jaxprune.io._load import load_model
  from jaxprune.models._convert import from_hf_layout, to_hf_layout
  from jaxprune.prune import NM
  from jaxprune.prune._sequential import _set_kernel, block_linears, kernel_at
  from jaxprune.prune.solvers import magnitude

  model = load_model("smollm2-135m")
  pattern = NM(2, 4)
  layers, groups, differing = [], 0, 0
  for block in model.params["layers"]:
    for paths in block_linears(model.config, block).values():
      for path in paths:
        w = np.asarray(to_hf_layout(kernel_at(block, path)))
        ours = np.asarray(magnitude(w, pattern=pattern).mask)
        theirs = topk_keep(w, pattern.n, pattern.m)
        groups += ours.size // pattern.m
        differing += int((ours != theirs).reshape(-1, pattern.m).any(-1).sum())
        block = _set_kernel(block, path, from_hf_layout(np.where(theirs, w, 0)))
    layers.append(block)
  params = jax.tree.map(np.asarray, {**model.params, "layers": layers})
  evals = np.load(args.reference / "eval_512x128.npy")
  ppl = perplexity(params, evals, config=model.config, batch_size=8, progress=False).perplexity
  reference = json.loads((args.reference / "results.json").read_text())["runs"]["magnitude:2:4"]["ppl"]
  result = {"command": "python experiments/parity/tie_order.py " + " ".join(sys.argv[1:]), "machine": machine(),
            "torch": torch.__version__, "groups": groups, "groups_where_masks_differ": differing,
            "ppl_with_torch_topk_masks": ppl, "reference_ppl": reference,
            "ratio_to_reference": ppl / reference}
  write_json(args.out, result)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
