"""Wanda and SparseGPT in PyTorch float32 on the reference tokens: is a gap to the reference arithmetic or method?

  python experiments/parity/torch_pass.py --case wanda:u60 --out /tmp/wanda_u60.json
  python experiments/parity/torch_pass.py --case sparsegpt:2:4 --window-order 1 --out /tmp/sparsegpt_24.json

The reference implementations' sequential pass, written here from their algorithms (not their code) on
transformers' own ``LlamaDecoderLayer`` (SDPA attention), with the model loaded from the GGUF by transformers:
the calibration windows go through each block one at a time, as the references do; hooks keep each
reference's statistic in its own running form (Wanda: the mean over windows of ``Σ_t x²``; SparseGPT:
``H = (2/n) Σ x xᵀ``); all 7 linears of a block are pruned from the dense block's inputs; the block is re-run with
pruned weights. Wanda prunes the lowest ``int(s·d_in)`` of ``|W_ij|·sqrt(s_j)`` per row (stable sort); SparseGPT
runs the blocked OBS pass (block 128, damping 1 % of the mean diagonal, dead inputs zeroed; unstructured: per
column block, every score up to the one at ``int(s·numel)``; N:M: the m − n lowest scores of each group, chosen
with ``torch.topk``). Then the perplexity over the 128 evaluation windows.

``--window-order SEED`` calibrates on the same 64 windows in another order: mathematically the same statistics,
only the order of float32 operations differs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import REFERENCE, machine, parse_case, reorder, write_json  # noqa: E402


class RunningStat:
  """One linear's calibration statistic, updated per window exactly as its reference keeps it."""

  def __init__(self, method: str, d_in: int, torch):
    self.method, self.torch, self.n = method, torch, 0
    shape = (d_in,) if method == "wanda" else (d_in, d_in)
    self.value = torch.zeros(shape)

  def add(self, x) -> None:  # x: (tokens, d_in), one window
    self.value *= self.n / (self.n + 1)
    self.n += 1
    if self.method == "wanda":
      self.value += self.torch.norm(x, p=2, dim=0) ** 2 / self.n
    else:
      x = math.sqrt(2 / self.n) * x.t()
      self.value += x.matmul(x.t())


def wanda(weight, norms, sparsity: float, torch):
  score = weight.abs() * norms.sqrt()[None, :]
  pruned = torch.sort(score, dim=-1, stable=True).indices[:, :int(weight.shape[1] * sparsity)]
  return weight.clone().scatter_(1, pruned, 0.0)


def sparsegpt(weight, h, torch, *, sparsity: float = 0.0, prune_n: int = 0, group: int = 0, block: int = 128,
              percdamp: float = 0.01):
  """Blocked OBS with lazy updates; ``prune_n`` of every ``group`` pruned when ``prune_n`` > 0."""
  w, h = weight.clone().float(), h.clone()
  cols = w.shape[1]
  dead = torch.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols)
  hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
  for i1 in range(0, cols, block):
    i2 = min(i1 + block, cols)
    w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
    q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
    if prune_n == 0:
      score = w1 ** 2 / torch.diag(hinv1).reshape(1, -1) ** 2
      mask = score <= torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
    else:
      mask = torch.zeros_like(w1, dtype=torch.bool)
    for i in range(i2 - i1):
      if prune_n and i % group == 0:
        score = w1[:, i:i + group] ** 2 / torch.diag(hinv1)[i:i + group].reshape(1, -1) ** 2
        mask.scatter_(1, i + torch.topk(score, prune_n, dim=1, largest=False)[1], True)
      col = w1[:, i]
      q = col.clone()
      q[mask[:, i]] = 0
      q1[:, i] = q
      err = (col - q) / hinv1[i, i]
      w1[:, i:] -= err.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
      err1[:, i] = err
    w[:, i1:i2] = q1
    w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
  return w


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--reference", type=Path, default=REFERENCE)
  p.add_argument("--case", default="wanda:u60", help="wanda:uNN, sparsegpt:uNN or sparsegpt:N:M (N kept of M)")
  p.add_argument("--window-order", type=int, default=0,
                 help="calibrate on the same windows permuted with this seed (0: as given)")
  p.add_argument("--masks", type=Path, help="also save the nonzero patterns, {block/linear: bool [out, in]}, as .npz")
  p.add_argument("--out", type=Path, required=True)
  args = p.parse_args()
  import numpy as np
  import torch
  import transformers

  from jaxprune.io._load import embedded_path
  from jaxprune.prune import NM

  method, pattern = parse_case(args.case)
  if method not in ("wanda", "sparsegpt") or (method == "wanda" and isinstance(pattern, NM)):
    raise SystemExit(f"--case: expected wanda:uNN, sparsegpt:uNN or sparsegpt:N:M, got {args.case!r}")
  if isinstance(pattern, NM):
    options = {"prune_n": pattern.m - pattern.n, "group": pattern.m}
  else:
    options = {"sparsity": pattern.sparsity}
  torch.manual_seed(0)
  path = embedded_path("smollm2-135m")
  model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
  calib = torch.from_numpy(reorder(np.load(args.reference / "calib_512x64.npy"), args.window_order).astype(np.int64))
  evals = torch.from_numpy(np.load(args.reference / "eval_512x128.npy").astype(np.int64))
  start = time.perf_counter()
  masks = {}
  with torch.no_grad():
    h = [model.model.embed_tokens(calib[j:j + 1]) for j in range(len(calib))]
    rope = model.model.rotary_emb(h[0], torch.arange(calib.shape[1])[None])
    for i, layer in enumerate(model.model.layers):
      linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
      stats = {n: RunningStat(method, m.in_features, torch) for n, m in linears.items()}
      hooks = [m.register_forward_hook(lambda _m, inputs, _o, s=stats[n]: s.add(
          inputs[0].reshape(-1, inputs[0].shape[-1]).float())) for n, m in linears.items()]
      for x in h:
        layer(x, position_embeddings=rope)
      for hook in hooks:
        hook.remove()
      for name, m in linears.items():
        if method == "wanda":
          m.weight.copy_(wanda(m.weight, stats[name].value, options["sparsity"], torch))
        else:
          m.weight.copy_(sparsegpt(m.weight, stats[name].value, torch, **options))
        masks[f"{i}/{name}"] = (m.weight != 0).numpy()
      h = [layer(x, position_embeddings=rope) for x in h]
      print(f"block {i} done, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    prune_seconds = time.perf_counter() - start
    losses = []
    for j in range(len(evals)):
      logits = model(evals[j:j + 1]).logits[0, :-1]
      losses.append(float(torch.nn.functional.cross_entropy(logits, evals[j, 1:])))
  ppl = math.exp(sum(losses) / len(losses))
  if args.masks:
    np.savez_compressed(args.masks, **masks)
  zeros = sum(int((~mask).sum()) for mask in masks.values())
  total = sum(mask.size for mask in masks.values())
  reference = json.loads((args.reference / "results.json").read_text())["runs"].get(args.case, {}).get("ppl")
  result = {"command": "python experiments/parity/torch_pass.py " + " ".join(sys.argv[1:]), "machine": machine(),
            "torch": torch.__version__, "transformers": transformers.__version__, "case": args.case,
            "window_order": args.window_order, "ppl": ppl, "reference_ppl": reference,
            "ratio_to_reference": ppl / reference if reference else None,
            "measured_linear_sparsity": zeros / total, "prune_seconds": prune_seconds}
  write_json(args.out, result)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
