"""Wanda in PyTorch float32 on the reference tokens: is a gap to the reference arithmetic or algorithm?

  python experiments/parity/wanda_torch.py --sparsity 0.6 --out experiments/parity/wanda_torch.json

The same sequential Wanda pass as jaxprune's (all linears of a block scored from the dense block's inputs,
``|W_ij|·sqrt(mean over windows of Σ_t x_tj²)``, the lowest ``int(s·d_in)`` of each row pruned with a stable
sort, the block re-run with pruned weights), written here in PyTorch on transformers' own ``LlamaDecoderLayer``
(SDPA attention) with the model loaded from the GGUF by transformers, one calibration window at a time as the
reference does, then the perplexity over the 128 evaluation windows. If this lands on the reference's number
and jaxprune does not, the difference is float32 arithmetic (torch's kernels against XLA's), not the method.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import REFERENCE, machine, write_json  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--reference", type=Path, default=REFERENCE)
  p.add_argument("--sparsity", type=float, default=0.6)
  p.add_argument("--out", type=Path, default=Path(__file__).with_name("wanda_torch.json"))
  args = p.parse_args()

  import numpy as np
  import torch
  import transformers

  from jaxprune.io.load import embedded_path

  torch.manual_seed(0)
  path = embedded_path("smollm2-135m")
  model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
  calib = torch.from_numpy(np.load(args.reference / "calib_512x64.npy").astype(np.int64))
  evals = torch.from_numpy(np.load(args.reference / "eval_512x128.npy").astype(np.int64))
  start = time.perf_counter()
  with torch.no_grad():
    h = [model.model.embed_tokens(calib[j:j + 1]) for j in range(len(calib))]
    positions = torch.arange(calib.shape[1])[None]
    rope = model.model.rotary_emb(h[0], positions)
    for layer in model.model.layers:
      linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
      norms = {n: torch.zeros(m.in_features) for n, m in linears.items()}
      seen: dict[str, int] = {}

      def hook(name):
        def add(_module, inputs, _output):  # running mean over windows of Σ_t x², as the reference keeps it
          x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
          k = seen.get(name, 0)
          norms[name] *= k / (k + 1)
          seen[name] = k + 1
          norms[name] += torch.norm(x, p=2, dim=0) ** 2 / (k + 1)
        return add

      handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
      for x in h:
        layer(x, position_embeddings=rope)
      for handle in handles:
        handle.remove()
      for name, m in linears.items():
        score = m.weight.abs() * norms[name].sqrt()[None, :]
        pruned = torch.sort(score, dim=-1, stable=True).indices[:, :int(m.in_features * args.sparsity)]
        m.weight.scatter_(1, pruned, 0.0)
      h = [layer(x, position_embeddings=rope) for x in h]
    prune_seconds = time.perf_counter() - start
    losses = []
    for j in range(len(evals)):
      logits = model(evals[j:j + 1]).logits[0, :-1]
      losses.append(float(torch.nn.functional.cross_entropy(logits, evals[j, 1:])))
  ppl = math.exp(sum(losses) / len(losses))
  zeros = sum(int((m.weight == 0).sum()) for layer in model.model.layers for m in layer.modules()
              if isinstance(m, torch.nn.Linear))
  total = sum(m.weight.numel() for layer in model.model.layers for m in layer.modules()
              if isinstance(m, torch.nn.Linear))
  case = f"wanda:u{round(args.sparsity * 100)}"
  reference = json.loads((args.reference / "results.json").read_text())["runs"].get(case, {}).get("ppl")
  result = {"command": "python experiments/parity/wanda_torch.py " + " ".join(sys.argv[1:]), "machine": machine(),
            "torch": torch.__version__, "transformers": transformers.__version__, "case": case, "ppl": ppl,
            "reference_ppl": reference, "ratio_to_reference": ppl / reference if reference else None,
            "measured_linear_sparsity": zeros / total, "prune_seconds": prune_seconds}
  write_json(args.out, result)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
