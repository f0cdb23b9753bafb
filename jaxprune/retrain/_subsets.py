"""Which parameters a retraining run updates: the trainable-subset spec, boolean masks over params, counts.

PERP (Zimmer et al. 2024, "PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs", arXiv:2312.15230)
retrains only a tiny subset after pruning: biases and norm parameters (0.01–0.05 % of a model), optionally the LM
head, plus low-rank adapters on the pruned linears. ``all`` is masked full fine-tuning (Gholami & Omar 2023):
every parameter trains and the pruned weights are held at zero (see :func:`jaxprune.retrain.project_masked`).

Selectors, on the params tree ``{"embed": ..., "layers": [block, ...], "head": ...}``:

- ``biases``: every leaf named ``bias``: linear biases, LayerNorm biases (OPT) and depth-recovery adapter biases.
  PERP's code makes every module's ``bias`` trainable, LayerNorm biases included. LLaMA linears have none;
  :func:`with_biases` adds zero ones.
- ``norms``: every parameter of a module whose name ends in ``norm`` (``input_layernorm``,
  ``post_attention_layernorm``, ``norm``; Qwen3's per-head ``self_attn/q_norm``, ``self_attn/k_norm``; OPT's
  ``self_attn_layer_norm``, ``final_layer_norm``), i.e. RMSNorm scales and LayerNorm scales and biases. An OPT
  LayerNorm bias is in both ``biases`` and ``norms``.
- ``head``: the LM head matrix (and OPT's ``project_out``). With tied embeddings the head *is* the token embedding,
  so ``head`` selects ``embed/embed_tokens/embedding``.
- ``embeddings``: everything under ``embed`` (token and OPT position embeddings, ``project_in``).
- ``all``: every parameter.

Adapters (``lora:R``, ``masklora:R``, ``scalelora:R``; see :mod:`jaxprune.retrain._adapters`) live in a separate
pytree; the linear kernels they adapt stay frozen in the mask.

>>> spec = parse_train_spec("masklora:16, norms,biases")
>>> str(spec), spec.scale
('biases,norms,masklora:16', 2.0)
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from jaxprune.errors import JaxpruneError

if TYPE_CHECKING:
  from jaxprune.models import ModelConfig

SUBSETS = ("all", "biases", "norms", "head", "embeddings")
ADAPTER_KINDS = ("lora", "masklora", "scalelora")  # the adapter names, here and everywhere else
DEFAULT_RANK = 16  # PERP's lora_r
DEFAULT_ALPHA = 32.0  # PERP's lora_alpha
# Names of the linears (last path component inside a block) that get adapters: PERP's ``target_modules``, every
# attention and MLP projection of LLaMA-family and OPT blocks.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1",
                   "fc2")
_KNOWN = ", ".join(SUBSETS + tuple(f"{k}:R" for k in ADAPTER_KINDS))


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """What a retraining run updates. Frozen and hashable: usable as a static argument of ``jax.jit``.

  ``subsets``: names from :data:`SUBSETS` in canonical order (``("all",)`` alone for masked full fine-tuning);
  ``adapter``: one of :data:`ADAPTER_KINDS` or None; ``rank``: adapter rank ``r`` (0 without adapter);
  ``alpha``: LoRA/MaskLoRA scale numerator (``W + (alpha/r)·BA``; ScaleLoRA has no scale);
  ``targets``: names of the linears inside a block that get adapters.
  """

  subsets: tuple[str, ...] = ()
  adapter: str | None = None
  rank: int = 0
  alpha: float = DEFAULT_ALPHA
  targets: tuple[str, ...] = DEFAULT_TARGETS

  def __post_init__(self):
    unknown = [s for s in self.subsets if s not in SUBSETS]
    if unknown:
      raise JaxpruneError(f"unknown trainable subset {unknown[0]!r}; known: {_KNOWN}")
    object.__setattr__(self, "subsets", tuple(s for s in SUBSETS if s in self.subsets))  # canonical: equal specs
    object.__setattr__(self, "targets", tuple(self.targets))
    if "all" in self.subsets and (len(self.subsets) > 1 or self.adapter):
      raise JaxpruneError("trainable subset 'all' trains every parameter and cannot be combined with others")
    if self.adapter is None:
      if self.rank:
        raise JaxpruneError(f"adapter rank {self.rank} given without an adapter kind")
    else:
      if self.adapter not in ADAPTER_KINDS:
        raise JaxpruneError(f"unknown adapter {self.adapter!r}; known: {', '.join(ADAPTER_KINDS)}")
      if self.rank <= 0:
        raise JaxpruneError(f"adapter rank must be positive, got {self.adapter}:{self.rank}")
      if not self.targets:
        raise JaxpruneError(f"adapter {self.adapter} has no target linears")
    if not self.subsets and self.adapter is None:
      raise JaxpruneError("empty trainable-subset spec: nothing would train")
    if not self.alpha > 0:
      raise JaxpruneError(f"adapter alpha must be positive, got {self.alpha}")

  @property
  def full(self) -> bool:
    """Masked full fine-tuning (``all``)."""
    return self.subsets == ("all",)

  @property
  def scale(self) -> float:
    """``alpha / r`` of LoRA and MaskLoRA (0.0 without adapter)."""
    return self.alpha / self.rank if self.rank else 0.0

  def __str__(self) -> str:
    return ",".join(self.subsets + ((f"{self.adapter}:{self.rank}",) if self.adapter else ()))


def parse_train_spec(text: str, *, alpha: float = DEFAULT_ALPHA,
                     targets: tuple[str, ...] = DEFAULT_TARGETS) -> TrainSpec:
  """Parses ``"biases,norms,masklora:16"`` or ``"all"`` into a :class:`TrainSpec`.

  Items are comma-separated, in any order; an adapter without ``:R`` gets rank :data:`DEFAULT_RANK`. At most one
  adapter kind.
  """
  subsets, adapters = set(), []
  for item in (part.strip() for part in text.split(",")):
    if not item:
      continue
    name, colon, rank = item.partition(":")
    if name in ADAPTER_KINDS:
      if colon and not rank.strip().lstrip("-").isdigit():
        raise JaxpruneError(f"adapter rank must be an integer, got {item!r}")
      adapters.append((name, int(rank) if colon else DEFAULT_RANK))
    elif name in SUBSETS:
      if colon:
        raise JaxpruneError(f"trainable subset {name!r} takes no ':' argument, got {item!r}")
      subsets.add(name)
    else:
      raise JaxpruneError(f"unknown trainable subset {item!r}; known: {_KNOWN}")
  if len(adapters) > 1:
    raise JaxpruneError(f"one adapter at most, got {', '.join(f'{k}:{r}' for k, r in adapters)}")
  kind, rank = adapters[0] if adapters else (None, 0)
  return TrainSpec(tuple(s for s in SUBSETS if s in subsets), kind, rank, float(alpha), tuple(targets))


def _key(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "idx", entry)))


def _path(keypath) -> tuple[str, ...]:
  return tuple(_key(k) for k in keypath)


def linear_paths(block: Mapping) -> tuple[str, ...]:
  """Paths (``"self_attn/q_proj"``, ``"fc1"``) of the linears of a block's params: the dicts holding a
  ``kernel``, in sorted order."""
  found = []

  def walk(node: Mapping, prefix: str):
    for name, child in node.items():
      if isinstance(child, Mapping):
        if "kernel" in child:
          found.append(prefix + name)
        else:
          walk(child, prefix + name + "/")

  walk(block, "")
  return tuple(sorted(found))


def get_path(block: Mapping, path: str) -> Any:
  """``block["self_attn"]["q_proj"]`` for ``path = "self_attn/q_proj"``."""
  node = block
  for part in path.split("/"):
    node = node[part]
  return node


def set_path(block: Mapping, path: str, value: Any) -> dict:
  """A copy of ``block`` with the node at ``path`` replaced; only the dicts along ``path`` are copied, every other
  node (and array) is shared."""
  head, _, rest = path.partition("/")
  return {**block, head: set_path(block[head], rest, value) if rest else value}


def _selectors(params: Mapping) -> dict:
  head = params.get("head", {}) if isinstance(params, Mapping) else {}
  tied = isinstance(head, Mapping) and "lm_head" not in head

  def head_leaf(p):
    return ((p[0] == "head" and len(p) > 2 and p[-2] in ("lm_head", "project_out"))
            or (tied and p == ("embed", "embed_tokens", "embedding")))

  return {
      "all": lambda p: True,
      "biases": lambda p: p[-1] == "bias",
      "norms": lambda p: len(p) > 1 and p[-2].endswith("norm"),
      "head": head_leaf,
      "embeddings": lambda p: p[0] == "embed",
  }


def trainable_mask(params: Mapping, spec: TrainSpec, *, strict: bool = True) -> Any:
  """Pytree of Python bools, same structure as ``params``: True where ``spec`` trains the leaf.

  Works on arrays and on ``jax.ShapeDtypeStruct`` trees (``jax.eval_shape`` of a 7B model costs nothing), and
  on trees with ``None`` placeholders (see :func:`partition`). With ``strict``, a subset that selects nothing
  raises: ``biases`` on LLaMA without :func:`with_biases` would silently train nothing.
  """
  selectors = _selectors(params)
  chosen = [selectors[s] for s in spec.subsets]
  mask = jax.tree_util.tree_map_with_path(lambda kp, _: any(f(_path(kp)) for f in chosen), params)
  if strict:
    paths = [_path(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]
    for name in spec.subsets:
      if not any(selectors[name](p) for p in paths):
        hint = " (LLaMA linears have no biases: add zero ones with with_biases)" if name == "biases" else ""
        raise JaxpruneError(f"trainable subset {name!r} selects no parameter{hint}")
  return mask


def count(params: Any, mask: Any, *, adapters: Any = None) -> tuple[int, int, float]:
  """``(trainable, total, trainable / total)`` parameter counts; ``mask`` as from :func:`trainable_mask`.

  ``adapters`` (optional) count as trainable and towards the total, as PERP reports them.
  """
  total = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  trainable = sum(jax.tree.leaves(jax.tree.map(lambda m, p: math.prod(p.shape) if m else 0, mask, params)))
  if adapters is not None:
    extra = sum(math.prod(a.shape) for a in jax.tree.leaves(adapters))
    total, trainable = total + extra, trainable + extra
  return trainable, total, trainable / total if total else 0.0


def partition(params: Any, mask: Any) -> tuple[Any, Any]:
  """``(trainable, frozen)``: two trees of ``params``' structure with ``None`` where the other one holds the
  leaf. The optimizer sees only ``trainable`` (no state, no gradient for frozen leaves); the frozen arrays are
  the very same objects as in ``params``."""
  trainable = jax.tree.map(lambda m, p: p if m else None, mask, params)
  frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)
  return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
  """Inverse of :func:`partition`: the leaf of whichever tree is not ``None``."""
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def measured_masks(params: Mapping) -> list[dict[str, jax.Array]]:
  """Per block, ``{linear path: kernel != 0}`` (bool, kernel layout ``(d_in, d_out)``): the sparsity mask of a
  pruned model, as PERP's MaskLoRA reads it from the weights."""
  return [{p: get_path(block, p)["kernel"] != 0 for p in linear_paths(block)} for block in params["layers"]]


def with_biases(params: Mapping, config: ModelConfig) -> tuple[dict, ModelConfig]:
  """``(params, config)`` with a zero bias ``(d_out,)`` on every linear of every block, and the config flags
  ``qkv_bias = o_bias = mlp_bias = True`` so that the model creates and adds them.

  The model is unchanged (the biases are zero); they make ``biases`` a PERP subset for LLaMA. Export: for
  ``model_type`` ``llama`` :func:`jaxprune.models.to_hf_config` writes ``attention_bias = qkv_bias`` and
  ``mlp_bias``; Hugging Face's ``attention_bias`` puts a bias on q, k, v **and** o_proj, hence both attention flags.
  Mistral, Qwen2 and Qwen3 configs cannot express biases on every linear (Qwen2: q, k, v only; Qwen3: attention
  only), nor OPT with ``enable_bias = false`` (not written back on export): refused. Blocks of an OPT with biases,
  or of a LLaMA that has them all already, are returned unchanged.
  """
  flags = (config.qkv_bias, config.o_bias, config.mlp_bias)
  if all(flags):
    return params, config
  model_type = json.loads(config.hf_config_json or "{}").get("model_type", config.family)
  if config.family != "llama" or model_type != "llama":
    raise JaxpruneError(f"cannot add linear biases to a {model_type} model: its Hugging Face config has no flag for "
                        "a bias on every linear (only model_type llama: attention_bias, mlp_bias)")

  def add(block: Mapping) -> dict:
    for path in linear_paths(block):
      linear = get_path(block, path)
      if "bias" not in linear:
        kernel = linear["kernel"]
        block = set_path(block, path, {**linear, "bias": jnp.zeros(kernel.shape[-1:], kernel.dtype)})
    return block

  new = {**params, "layers": [add(block) for block in params["layers"]]}
  return new, config.replace(qkv_bias=True, o_bias=True, mlp_bias=True)
