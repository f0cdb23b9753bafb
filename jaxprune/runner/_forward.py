"""The jitted pieces of a forward pass: embedding, one block (optionally with taps, or with the squared norms of
its taps summed), head with the one cross-entropy, and the loss of the whole model with its gradient.

Each is a module-level ``jax.jit`` over a *static* block config (``ModelConfig`` without its structure edits:
:func:`static_config`) and a block's sublayer ``modes``, so every block of the same shape and modes shares one
compilation whatever the depth or the structure edits elsewhere.

``windowed``: the windows of a batch go through a block one at a time (a ``lax.map`` over the batch axis). On a
CPU the large per-window intermediates (attention scores, the MLP's hidden layer) then stay in cache between the
product that writes them and the elementwise work that reads them. It is a batching choice; the model computes
the same function either way.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig
from jaxprune.models._layers import Context, compute_dtype
from jaxprune.runner._batches import weighted

CE_CHUNK = 128  # positions whose logits are alive at once in the cross-entropy


def static_config(config: ModelConfig) -> ModelConfig:
  """``config`` without its structure edits (per-layer sublayer modes, depth, per-layer widths): what one block,
  the embedding or the head depends on (a block's widths come from its parameters' shapes)."""
  return config.replace(sublayers=(), num_layers=1, layer_widths=())


def _window_by_window(fn, windowed: bool, *xs):
  """``fn(*xs)`` for pytrees ``xs`` whose leaves have a leading window axis; with ``windowed``, one window at a
  time. ``fn`` must treat windows independently and return leaves with the window axis in front."""
  if not windowed or jax.tree.leaves(xs)[0].shape[0] == 1:
    return fn(*xs)

  def one(window):
    out = fn(*jax.tree.map(lambda x: x[None], window))
    return jax.tree.map(lambda y: y[0], out)

  return jax.lax.map(one, xs)


def block_forward(block_params, h, ctx: Context, given=None, *, config: ModelConfig, modes, windowed: bool):
  """One block: ``h`` ``(b, t, d)`` -> ``(b, t, d)`` (``given``: tap values replacing those inputs)."""
  fn = lambda h, ctx, given: M.block(block_params, h, ctx, config=config, modes=modes, given=given)  # noqa: E731
  return _window_by_window(fn, windowed, h, ctx, given)


def block_taps(block_params, h, ctx: Context, given=None, *, config: ModelConfig, modes, names, windowed: bool):
  """The taps ``names`` of one block ``{name: (b, t, width)}``; what feeds none of them is not computed."""
  def fn(h, ctx, given):
    _, taps = M.block(block_params, h, ctx, config=config, modes=modes, taps=True, given=given)
    return {name: taps[name] for name in names}

  return _window_by_window(fn, windowed, h, ctx, given)


def block_tap_sums(block_params, h, ctx: Context, given, weights, sums, *, config: ModelConfig, modes, names, keep,
                   windowed: bool):
  """``(sums, kept)``: ``sums[name]`` plus ``Σ_b Σ_t (w_b x_btd)²`` in float32 ``(width,)`` (as
  :func:`jaxprune.prune.accumulate` sums them) for the taps ``names`` of one block (``w`` the window ``weights``
  ``(b,)``, 0 for padding), each window's sum taken where its taps are computed, and the taps ``keep`` themselves
  ``{name: (b, t, width)}``. With ``windowed``, a tap that is only summed never leaves the window's step."""
  def fn(h, ctx, given, weights):
    _, taps = M.block(block_params, h, ctx, config=config, modes=modes, taps=True, given=given)
    per_window = {name: jnp.sum(jnp.square(weighted(held(taps[name]), weights).astype(jnp.float32)), axis=1)
                  for name in names}
    return per_window, {name: taps[name] for name in keep}

  per_window, kept = _window_by_window(fn, windowed, h, ctx, given, weights)
  return {name: sums[name] + jnp.sum(s, axis=0) for name, s in per_window.items()}, kept


def held(x):
  """``x`` rounded to its dtype, where that is narrower than float32. XLA may compute a narrow value's consumers
  in the same program from the float32 it was rounded from (excess precision); the statistics of a tap are those of
  the tap as its dtype holds it, as when it is written out and as the reference implementations read a
  half-precision linear's input (``test_tap_sums_of_a_bfloat16_block_are_those_of_its_taps_as_held``)."""
  info = jnp.finfo(x.dtype)
  if info.bits >= 32:
    return x
  return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _over_positions(fn, params, h, extra, *, config: ModelConfig, chunk: int):
  """``fn(logits (b, c, vocab) float32, extra (b, c))`` over the predicting positions ``0 .. t-2`` of ``h``
  ``(b, t, d)``, ``chunk`` positions at a time (a ``lax.map`` over the sequence, so ``(b, chunk, vocab)`` rather
  than ``(b, t, vocab)`` logits are alive at once); returns ``(b, t - 1)``."""
  b, t, d = h.shape
  n = t - 1
  pad = -n % chunk
  hs = jnp.pad(h[:, :-1], ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d).swapaxes(0, 1)
  xs = jnp.pad(extra, ((0, 0), (0, pad))).reshape(b, -1, chunk).swapaxes(0, 1)

  def one(args):
    h1, x1 = args
    logits = M.head(params, h1, config=config)
    return fn(logits.astype(compute_dtype(logits.dtype)), x1)

  return jax.lax.map(one, (hs, xs)).swapaxes(0, 1).reshape(b, -1)[:, :n]


def _nll(logits, targets):
  return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def token_losses(params, h, tokens, *, config: ModelConfig, chunk: int = CE_CHUNK, targets=None):
  """Next-token cross-entropy ``(b, t - 1)`` float32 of the stream ``h`` ``(b, t, d)`` leaving the last block:
  ``logsumexp - logit[target]`` in float32, the targets being ``tokens[:, 1:]`` unless given ``(b, t - 1)``."""
  targets = tokens[:, 1:] if targets is None else targets
  return _over_positions(_nll, params, h, targets, config=config, chunk=chunk)


def sample_targets(params, h, key, *, config: ModelConfig, chunk: int = CE_CHUNK):
  """Next tokens ``(b, t - 1)`` int32 drawn from the model's own predictive distribution at every position (the
  labels of the true Fisher)."""
  b, t, _ = h.shape
  keys = jax.random.randint(key, (b, t - 1), 0, jnp.iinfo(jnp.int32).max, jnp.int32)

  def draw(logits, seeds):
    return jax.vmap(jax.vmap(lambda l, s: jax.random.categorical(jax.random.key(s), l)))(logits, seeds)

  return _over_positions(draw, params, h, keys, config=config, chunk=chunk).astype(jnp.int32)


def model_window_losses(params, tokens, ctx: Context, *, config: ModelConfig, layer_modes, windowed: bool,
                        remat: bool = False):
  """Mean next-token cross-entropy per window ``(b,)`` of the whole model on ``tokens`` ``(b, t)``.

  ``layer_modes``: the sublayer modes of every layer (``config.sublayer_modes(i)``); ``remat`` recomputes each
  block's activations in the backward pass instead of storing them (``jax.checkpoint``).
  """
  h = M.embed(params, tokens, config=config)
  for block_params, modes in zip(params["layers"], layer_modes):
    step = functools.partial(block_forward, config=config, modes=modes, windowed=windowed)
    h = (jax.checkpoint(step) if remat else step)(block_params, h, ctx)
  return jnp.mean(token_losses(params, h, tokens, config=config), axis=-1)


embed = jax.jit(M.embed, static_argnames=("config",))
block = jax.jit(block_forward, static_argnames=("config", "modes", "windowed"))
taps = jax.jit(block_taps, static_argnames=("config", "modes", "names", "windowed"))
tap_sums = jax.jit(block_tap_sums, static_argnames=("config", "modes", "names", "keep", "windowed"),
                   donate_argnames=("sums",))


@functools.partial(jax.jit, static_argnames=("config",))
def head_losses(params, h, tokens, *, config):
  """Mean next-token cross-entropy per window ``(b,)`` of the stream ``h`` leaving the last block."""
  return jnp.mean(token_losses(params, h, tokens, config=config), axis=-1)


def _combine(trainable, frozen):
  """Parameters from the two halves of :func:`split` (``None`` marks the leaves held by the other half)."""
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def split(params, trainable_mask):
  """``(trainable, frozen)``: two trees shaped like ``params``, each ``None`` where the other holds the leaf.

  ``trainable_mask``: a tree of bools with the structure of ``params`` (``True`` = trained).
  """
  trainable = jax.tree.map(lambda p, m: p if m else None, params, trainable_mask)
  frozen = jax.tree.map(lambda p, m: None if m else p, params, trainable_mask)
  return trainable, frozen


@functools.partial(jax.jit, static_argnames=("config", "layer_modes", "windowed", "remat", "assemble"))
def loss_and_grad(trainable, frozen, tokens, weights, ctx, *, config, layer_modes, windowed, remat, assemble=None):
  """``(loss, grads)``: the weighted mean window loss ``Σ w_b L_b / Σ w_b`` of the model
  ``assemble(trainable, frozen)`` (default: the union of the two halves of :func:`split`) and its gradient with
  respect to ``trainable``."""
  def loss(trainable):
    params = (assemble or _combine)(trainable, frozen)
    per_window = model_window_losses(params, tokens, ctx, config=config, layer_modes=layer_modes,
                                     windowed=windowed, remat=remat)
    return jnp.sum(per_window * weights) / jnp.sum(weights)

  return jax.value_and_grad(loss)(trainable)


@functools.partial(jax.jit, static_argnames=("config", "modes", "windowed", "assemble"))
def block_loss_and_grad(trainable, frozen, h, target, weights, ctx, *, config, modes, windowed, assemble=None):
  """``(loss, grads)``: the weighted mean over windows ``Σ w_b E_b / Σ w_b`` of the mean squared error
  ``E_b = mean_{t,d} (block(h)_btd − target_btd)²`` (float32, or float64 for a float64 block) of one block
  ``assemble(trainable, frozen)``
  (default: the union of the two halves of :func:`split`) on its inputs ``h`` ``(b, t, d)`` against ``target``
  ``(b, t, d)``, and its gradient with respect to ``trainable`` (layer-wise reconstruction)."""
  def loss(trainable):
    block_params = (assemble or _combine)(trainable, frozen)
    out = block_forward(block_params, h, ctx, config=config, modes=modes, windowed=windowed)
    dtype = compute_dtype(out.dtype)
    per_window = jnp.mean(jnp.square(out.astype(dtype) - target.astype(dtype)), axis=(1, 2))
    return jnp.sum(per_window * weights.astype(dtype)) / jnp.sum(weights.astype(dtype))

  return jax.value_and_grad(loss)(trainable)


def _gram(x, w):
  """``Σ_tokens w · x xᵀ`` of ``x`` ``(b, t, d)`` with window weights ``w`` ``(b,)``, float32 HIGHEST."""
  x = x.astype(compute_dtype(x.dtype))
  x = (x * jnp.sqrt(w).astype(x.dtype)[:, None, None]).reshape(-1, x.shape[-1])
  return jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("config", "layer_modes", "groups", "windowed", "sampled"),
                   donate_argnames=("moments",))
def curvature_step(moments, params, tokens, weights, key, ctx, *, config, layer_modes, groups, windowed, sampled):
  """Adds one batch to the Kronecker factors of every linear: one forward with taps and one backward.

  ``groups``: per layer, ``((tap, (linear path, ...)), ...)``. ``moments``: per layer ``{"A": {tap: (d_in, d_in)},
  "a": {tap: (d_in,)}, "G": {path: (d_out, d_out)}}``, sums over tokens of ``a aᵀ``, ``a`` and ``g gᵀ``, where
  ``a`` is a linear's input and ``g`` the gradient at its output of ``Σ_b w_b Σ_t NLL_bt`` (labels drawn from the
  model when ``sampled``, the data's next tokens otherwise). Narrow ``a`` and ``g`` are taken as their dtype holds
  them (:func:`held`).
  """
  def forward(deltas):
    h = M.embed(params, tokens, config=config)
    inputs = []
    for block_params, modes, d, layer_groups in zip(params["layers"], layer_modes, deltas, groups):
      names = tuple(tap for tap, _ in layer_groups)
      fn = lambda h, ctx, d: M.block(block_params, h, ctx, config=config, modes=modes, taps=True,  # noqa: E731
                                     deltas=d)
      h, taps = _window_by_window(fn, windowed, h, ctx, d)
      inputs.append({name: taps[name] for name in names})
    targets = (jax.lax.stop_gradient(sample_targets(params, h, key, config=config)) if sampled else None)
    losses = token_losses(params, h, tokens, config=config, targets=targets)
    loss = jnp.sum(losses * weights.astype(losses.dtype)[:, None])
    return loss, inputs

  b, t = tokens.shape
  zeros = [{path: jnp.zeros((b, t, g.shape[0]), g.dtype) for path, g in layer["G"].items()}
           for layer in moments]
  grads, inputs = jax.grad(forward, has_aux=True)(zeros)
  out = []
  for layer, x, g in zip(moments, inputs, grads):
    x, g = {tap: held(v) for tap, v in x.items()}, {path: held(v) for path, v in g.items()}
    out.append({"A": {tap: layer["A"][tap] + _gram(x[tap], weights) for tap in layer["A"]},
                "a": {tap: layer["a"][tap] + jnp.einsum("btd,b->d", x[tap], weights.astype(x[tap].dtype))
                      for tap in layer["a"]},
                "G": {path: layer["G"][path] + _gram(g[path], weights) for path in layer["G"]}})
  return out
