"""Low-rank adapters on the linears of a (pruned) model: LoRA, MaskLoRA, ScaleLoRA, as pure functions.

Zimmer et al. 2024, PERP (arXiv:2312.15230); LoRA: Hu et al. 2021 (arXiv:2106.09685). In the Hugging Face layout a
linear ``W`` is ``(d_out, d_in)`` and PEFT's factors are ``B (d_out, r)``, ``A (r, d_in)``. Here everything is in
the Flax kernel layout ``K = Wᵀ`` ``(d_in, d_out)``, with ``lora_a = Aᵀ`` ``(d_in, r)`` and ``lora_b = Bᵀ``
``(r, d_out)``, so that ``lora_a @ lora_b = (BA)ᵀ`` and no transpose is ever needed:

- LoRA:      ``K_eff = K + (α/r)·(a b)``                     (densifies a sparse ``K``)
- MaskLoRA:  ``K_eff = K + (α/r)·((a b) ⊙ M)``,  ``b = 0`` at init
- ScaleLoRA: ``K_eff = K ⊙ (a b)``,              ``a = b = 1/√r`` at init, so ``a b = 1``

``M`` (True = kept) is the pruning mask; without masks it is measured as ``K != 0``, as PERP's code does. Where
``M`` is False, MaskLoRA and ScaleLoRA return ``K`` itself (``jnp.where``), so every pruned zero stays exactly zero
through :func:`apply` and :func:`merge`. LoRA/MaskLoRA ``a`` is initialised as PEFT does (``kaiming_uniform`` with
``a=√5``: uniform in ``±1/√d_in``). Adapters are float32 whatever the model dtype (PERP trains in float32); the
effective kernel is computed in float32 and cast back to the kernel's dtype.

Adapters pytree: ``{"layers": [{linear path: {"lora_a": (d_in, r), "lora_b": (r, d_out)}}, ...]}``, one dict per
block. Masks: one dict per block, ``{linear path: bool (d_in, d_out)}``, or None.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxprune.errors import JaxpruneError
from jaxprune.retrain._subsets import TrainSpec, get_path, linear_paths, set_path

ADAPTER_PARAMS = ("lora_a", "lora_b")  # (d_in, r), (r, d_out) in the kernel layout
SPARSE_FRACTION = 0.01  # a kernel with more exact zeros than this is sparse (merge of plain LoRA refused)

Masks = Sequence[Mapping[str, jax.Array]]


def target_paths(block: Mapping, spec: TrainSpec) -> tuple[str, ...]:
  """The linears of ``block`` that get adapters: those whose last path component is in ``spec.targets``."""
  return tuple(p for p in linear_paths(block) if p.rsplit("/", 1)[-1] in spec.targets)


def lora_init(params: Mapping, spec: TrainSpec, *, key: jax.Array) -> dict:
  """Adapters for every targeted linear of every block (empty dicts without ``spec.adapter``).

  LoRA, MaskLoRA: ``lora_a ~ U(-1/√d_in, 1/√d_in)``, ``lora_b = 0`` (the model is unchanged at init).
  ScaleLoRA: ``lora_a = lora_b = 1/√r`` (``a b = 1``: the model is unchanged at init).
  """
  r = spec.rank
  layers = []
  for i, block in enumerate(params["layers"]):
    adapters = {}
    for j, path in enumerate(target_paths(block, spec) if spec.adapter else ()):
      d_in, d_out = get_path(block, path)["kernel"].shape
      if spec.adapter == "scalelora":
        value = 1.0 / jnp.sqrt(jnp.float32(r))
        a, b = jnp.full((d_in, r), value, jnp.float32), jnp.full((r, d_out), value, jnp.float32)
      else:
        bound = 1.0 / jnp.sqrt(jnp.float32(d_in))
        a = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, i), j), (d_in, r), jnp.float32,
                               -bound, bound)
        b = jnp.zeros((r, d_out), jnp.float32)
      adapters[path] = {"lora_a": a, "lora_b": b}
    layers.append(adapters)
  return {"layers": layers}


def _block_mask(masks: Masks | None, i: int, path: str, kernel: jax.Array) -> jax.Array:
  if masks is None:
    return kernel != 0
  if path not in masks[i]:
    raise JaxpruneError(f"masks of block {i} lack linear {path!r}")
  mask = masks[i][path]
  if mask.shape != kernel.shape:
    raise JaxpruneError(f"mask of block {i} {path} has shape {mask.shape}, kernel (d_in, d_out) is {kernel.shape}")
  return mask.astype(bool)


def effective_kernel(kernel: jax.Array, adapter: Mapping, mask: jax.Array | None, spec: TrainSpec) -> jax.Array:
  """``K_eff`` ``(d_in, d_out)`` of one linear (formulas in the module docstring); ``mask`` unused by LoRA."""
  w = kernel.astype(jnp.float32)
  ab = jnp.matmul(adapter["lora_a"].astype(jnp.float32), adapter["lora_b"].astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
  if spec.adapter == "lora":
    out = w + jnp.float32(spec.scale) * ab
  elif spec.adapter == "masklora":
    out = jnp.where(mask, w + jnp.float32(spec.scale) * ab, w)
  elif spec.adapter == "scalelora":
    out = jnp.where(mask, w * ab, w)
  else:
    raise JaxpruneError(f"unknown adapter {spec.adapter!r}")
  return out.astype(kernel.dtype)


def _check(params: Mapping, adapters: Mapping, masks: Masks | None) -> None:
  blocks = params["layers"]
  if len(adapters["layers"]) != len(blocks):
    raise JaxpruneError(f"adapters for {len(adapters['layers'])} blocks, model has {len(blocks)}")
  if masks is not None and len(masks) != len(blocks):
    raise JaxpruneError(f"masks for {len(masks)} blocks, model has {len(blocks)}")


def apply(params: Mapping, adapters: Mapping, masks: Masks | None, spec: TrainSpec) -> dict:
  """Params with every adapted kernel replaced by its effective kernel; every other leaf is the same object.

  Pure and differentiable with respect to ``adapters`` (and ``params``); jit it with ``spec`` static (it is
  hashable). ``masks``: see the module docstring; None measures ``kernel != 0``.
  """
  _check(params, adapters, masks)
  layers = []
  for i, (block, block_adapters) in enumerate(zip(params["layers"], adapters["layers"])):
    for path, adapter in block_adapters.items():
      linear = get_path(block, path)
      mask = _block_mask(masks, i, path, linear["kernel"]) if spec.adapter != "lora" else None
      block = set_path(block, path, {**linear, "kernel": effective_kernel(linear["kernel"], adapter, mask, spec)})
    layers.append(block)
  return {**params, "layers": layers}


def _sparse_kernel(params: Mapping, adapters: Mapping) -> str | None:
  """``"block i path (z % zeros)"`` of the first adapted kernel with more than :data:`SPARSE_FRACTION` exact zeros,
  else None. Needs concrete kernels."""
  for i, (block, block_adapters) in enumerate(zip(params["layers"], adapters["layers"])):
    for path in block_adapters:
      kernel = get_path(block, path)["kernel"]
      if isinstance(kernel, jax.core.Tracer):
        raise JaxpruneError("merge of plain LoRA under jit cannot measure sparsity: pass masks, "
                            "allow_densify=True, or call merge outside jit")
      zeros = float(jnp.mean(kernel == 0))
      if zeros > SPARSE_FRACTION:
        return f"block {i} {path} ({100 * zeros:.1f} % zeros)"
  return None


def merge(params: Mapping, adapters: Mapping, masks: Masks | None, spec: TrainSpec, *,
          allow_densify: bool = False) -> dict:
  """Folds the adapters into the kernels: the params a plain forward pass then uses (equal to :func:`apply`).

  MaskLoRA and ScaleLoRA keep every pruned zero exactly. Plain LoRA fills them in, so merging it into a sparse
  model (``masks`` given, or a kernel with more than 1 % exact zeros) raises unless ``allow_densify``.
  """
  _check(params, adapters, masks)
  if spec.adapter == "lora" and not allow_densify:
    where = "masks given" if masks is not None else _sparse_kernel(params, adapters)
    if where:
      raise JaxpruneError(f"merging plain LoRA would densify a sparse model ({where}); use masklora or scalelora, "
                          "or pass allow_densify=True")
  return apply(params, adapters, masks, spec)
