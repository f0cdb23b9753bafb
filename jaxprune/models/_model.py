"""The functional model API: embed, one block at a time, head.

Params are a dict ``{"embed": ..., "layers": [block params, ...], "head": ...}``. Each stage is a pure function
of (params, activations, static config); callers jit them. Blocks of the same shape and sublayer modes share
one compilation, which is what the layer-by-layer pruning pass relies on.
"""
from __future__ import annotations

import functools
from types import ModuleType

import jax
import jax.numpy as jnp

from jaxprune import _tree as tree
from jaxprune.models import _llama as llama, _opt as opt
from jaxprune.models._config import ModelConfig
from jaxprune.models._layers import DELTAS, MID, Context, attention_mask, positions_from_mask, rotary

Params = dict


def family(config: ModelConfig) -> ModuleType:
  """The module (``llama`` or ``opt``) that defines ``Embed``, ``Block``, ``Head`` and ``LINEAR_GROUPS``."""
  return {"llama": llama, "opt": opt}[config.family]


def linear_groups(config: ModelConfig) -> dict[str, tuple[str, ...]]:
  """Input tap name -> paths (``"self_attn/q_proj"``) of the linears of a block that read that input."""
  return family(config).LINEAR_GROUPS


def present_linears(config: ModelConfig, block_params: Params) -> dict[str, tuple[str, ...]]:
  """Tap name -> paths of the linears present in this block (a removed sublayer has none)."""
  groups = {}
  for name, paths in linear_groups(config).items():
    present = tuple(p for p in paths if p.split("/")[0] in block_params)
    if present:
      groups[name] = present
  return groups


def block_module(config: ModelConfig, modes: tuple[str, str] = ("full", "full")):
  return family(config).Block(config, modes=modes)


def context(config: ModelConfig, batch: int, seq: int, mask: jax.Array | None = None) -> Context:
  """The per-forward-pass :class:`Context` for ``(batch, seq)`` tokens and an optional padding ``mask``."""
  allowed = attention_mask(mask, batch, seq, config.sliding_window)
  if config.family == "opt":
    return Context(allowed)
  cos, sin = rotary(config, positions_from_mask(mask, batch, seq))
  return Context(allowed, cos, sin)


def embed(params: Params, tokens: jax.Array, *, config: ModelConfig, mask: jax.Array | None = None) -> jax.Array:
  """Token ids ``(batch, seq)`` -> hidden states ``(batch, seq, hidden)``."""
  module = family(config).Embed(config)
  if config.family == "opt":
    positions = positions_from_mask(mask, *tokens.shape)
    return module.apply({"params": params["embed"]}, tokens, positions)
  return module.apply({"params": params["embed"]}, tokens)


def block(block_params: Params, h: jax.Array, ctx: Context, *, config: ModelConfig,
          modes: tuple[str, str] = ("full", "full"), taps: bool = False, given: dict | None = None,
          deltas: dict | None = None):
  """One decoder layer: ``(batch, seq, hidden) -> (batch, seq, hidden)``.

  ``modes`` = ``config.sublayer_modes(layer)``; passing the modes rather than the layer index lets every block of
  the same shape share one compilation.
  With ``taps=True`` also returns ``{tap name: input of those linears}`` (see :func:`linear_groups`), and under
  :data:`MID` the residual stream entering the MLP sublayer.
  ``given`` = ``{tap name: value}`` replaces those inputs by the values given (same shapes); whatever only fed
  them is not computed. ``deltas`` = ``{linear path: (batch, seq, d_out)}`` is added to those linears' outputs
  (zeros give, by differentiation, the gradient with respect to the outputs).
  """
  module = block_module(block_config(config, block_params), modes)
  variables = {"params": block_params}
  if given:
    variables["given"] = _scoped(config, given)
  if deltas:
    variables[DELTAS] = tree.unflatten({f"{path}/out": value for path, value in deltas.items()})
  if not taps:
    return module.apply(variables, h, ctx)
  out, state = module.apply(variables, h, ctx, mutable=["taps"])
  return out, _sown(state.get("taps", {}))


def block_config(config: ModelConfig, block_params: Params) -> ModelConfig:
  """``config`` with the widths of ``block_params`` (a structurally pruned block may be narrower than the
  config's uniform widths): MLP units from its first MLP linear, heads and KV heads from its query and key
  projections. Shapes only, so it works on abstract params and costs nothing under ``jit``."""
  changes = {}
  attn, mlp = block_params.get("self_attn"), block_params.get("mlp")
  if config.family == "opt":
    mlp = block_params.get("fc1")
  if isinstance(attn, dict) and "q_proj" in attn and "kernel" in attn["q_proj"]:
    changes["num_heads"] = attn["q_proj"]["kernel"].shape[1] // config.head_dim
    changes["num_kv_heads"] = attn["k_proj"]["kernel"].shape[1] // config.head_dim
  if isinstance(mlp, dict):
    first = mlp.get("gate_proj", mlp)
    if "kernel" in first:
      changes["intermediate_size"] = first["kernel"].shape[1]
  if all(getattr(config, k) == v for k, v in changes.items()) and not config.layer_widths:
    return config
  return config.replace(layer_widths=(), **changes)


@functools.lru_cache(maxsize=None)
def tap_order(config: ModelConfig, modes: tuple[str, str] = ("full", "full")) -> tuple[str, ...]:
  """The taps of a block (:func:`linear_groups` present in ``modes``, and :data:`MID`) in the order the block
  computes them; traced abstractly, no computation."""
  names: list[str] = []

  def trace():  # the sown collection is an insertion-ordered dict inside the trace (pytree outputs are sorted)
    h = jnp.zeros((1, 2, config.hidden_size), jnp.float32)
    variables = block_module(config, modes).init(jax.random.key(0), h, context(config, 1, 2))
    names.extend(_sown(variables.get("taps", {})))

  jax.eval_shape(trace)
  return tuple(names)


def _scoped(config: ModelConfig, values: dict) -> dict:
  """``{tap: value}`` nested under the module that reads each tap (the scope of its linears; the block itself for
  :data:`MID`)."""
  tree: dict = {}
  for name, value in values.items():
    node = tree
    for part in (linear_groups(config)[name][0].split("/")[:-1] if name != MID else ()):
      node = node.setdefault(part, {})
    node[name] = value
  return tree


def _sown(tree: dict) -> dict:
  """Flattens the ``taps`` collection (sown values are 1-tuples, at any depth) to ``{tap: value}``."""
  flat = {}
  for name, value in tree.items():
    flat.update({name: value[0]} if isinstance(value, tuple) else _sown(value))
  return flat


def head(params: Params, h: jax.Array, *, config: ModelConfig) -> jax.Array:
  """Hidden states ``(batch, seq, hidden)`` -> logits ``(batch, seq, vocab)``."""
  embedding = params["embed"]["embed_tokens"]["embedding"] if config.tie_word_embeddings else None
  return family(config).Head(config).apply({"params": params["head"]}, h, embedding)


def forward(params: Params, tokens: jax.Array, *, config: ModelConfig, mask: jax.Array | None = None) -> jax.Array:
  """Full forward pass: token ids ``(batch, seq)`` -> logits ``(batch, seq, vocab)``."""
  ctx = context(config, *tokens.shape, mask)
  h = embed(params, tokens, config=config, mask=mask)
  for i, layer_params in enumerate(params["layers"]):
    h = block(layer_params, h, ctx, config=config, modes=config.sublayer_modes(i))
  return head(params, h, config=config)


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
  """Random params (for tests and abstract shapes); ``jax.eval_shape`` of it costs no memory. Compiled as one
  program per config: run op by op, Flax's initialisation compiles every operation on its own (seconds)."""
  return _init_params(config, key, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _init_params(config: ModelConfig, key: jax.Array, dtype) -> Params:
  fam = family(config)
  keys = jax.random.split(key, config.num_layers + 2)
  tokens = jnp.zeros((1, 2), jnp.int32)
  ctx = context(config, 1, 2)
  h = jnp.zeros((1, 2, config.hidden_size), jnp.float32)
  embed_args = (tokens, jnp.zeros((1, 2), jnp.int32)) if config.family == "opt" else (tokens,)
  params = {
      "embed": fam.Embed(config).init(keys[0], *embed_args)["params"],
      "layers": [block_module(config.for_layer(i), config.sublayer_modes(i)).init(keys[i + 2], h, ctx)["params"]
                 for i in range(config.num_layers)],
  }
  emb = params["embed"]["embed_tokens"]["embedding"]
  params["head"] = fam.Head(config).init(keys[1], h, emb).get("params", {})
  return jax.tree.map(lambda x: x.astype(dtype), params)


def abstract_params(config: ModelConfig, dtype=jnp.float32) -> Params:
  """``ShapeDtypeStruct`` tree of the params, without allocating them."""
  return jax.eval_shape(functools.partial(init_params, config, dtype=dtype), jax.random.key(0))
