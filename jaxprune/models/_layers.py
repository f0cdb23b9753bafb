"""Pieces shared by the model families: norms, rotary embeddings, masked attention, sublayer adapters, taps.

Dtypes: a model computes in the dtype of its weights (float32, bfloat16 or float16). Norms, softmax and losses
run in :func:`compute_dtype` (float32 for the narrower floats). Every matrix product -- the linears, the attention
scores and values, the LM head -- accumulates in :func:`compute_dtype` and takes :func:`matmul_precision`:
``HIGHEST`` for float32 weights (full float32 products on every backend: a GPU's default would be TF32, a TPU's
one bfloat16 pass), ``DEFAULT`` for bfloat16 and float16 weights (their native products). Linear and attention
outputs are rounded back to the weights' dtype; logits stay in float32. (OPT-350m's ``project_in``/``project_out``
are plain ``nn.Dense`` layers at the backend's default precision.)
"""
from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jaxprune.models._config import ModelConfig


class Context(NamedTuple):
  """What every block of a forward pass shares: the attention mask ``(b, 1, t, t)`` and, for rotary
  models, ``cos, sin`` ``(b, t, head_dim)``."""

  mask: jax.Array
  cos: jax.Array | None = None
  sin: jax.Array | None = None


class RMSNorm(nn.Module):
  """LLaMA RMSNorm, computed in float32 (or wider) as transformers does. ``x``: ``(..., d)``."""

  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(compute_dtype(x.dtype))
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (_lead(scale, x.ndim) * x32.astype(x.dtype)).astype(x.dtype)


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for narrower floats, the dtype itself for wider ones: norms, softmax and losses run in it."""
  return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def matmul_precision(dtype) -> jax.lax.Precision:
  """The precision of every matrix product of a model computing in ``dtype``: ``HIGHEST`` for float32 (and
  float64), ``DEFAULT`` (the backend's native products) for bfloat16 and float16."""
  wide = jnp.dtype(dtype).itemsize >= 4
  return jax.lax.Precision.HIGHEST if wide else jax.lax.Precision.DEFAULT


def matmul(a, b, out_dtype=None):
  """``a @ b`` (``(..., m, k) @ (..., k, n)``, batch dimensions equal) accumulated in :func:`compute_dtype` at
  :func:`matmul_precision`, returned in ``out_dtype`` (default: ``a``'s dtype)."""
  return jnp.matmul(a, b, precision=matmul_precision(a.dtype),
                    preferred_element_type=compute_dtype(a.dtype)).astype(out_dtype or a.dtype)


def _lead(v: jax.Array, ndim: int) -> jax.Array:
  """``v`` ``(d,)`` reshaped to broadcast against ``(..., d)`` of rank ``ndim`` (no implicit rank promotion)."""
  return v.reshape((1,) * (ndim - 1) + v.shape)


class Adapter(nn.Module):
  """Replacement of a removed sublayer: ``update = bias`` or ``update = (x @ down) @ up + bias``.

  ``x``: the residual stream entering the removed sublayer, ``(..., d)``; returns the update ``(..., d)``.
  """

  rank: int = 0  # 0 = bias only

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    out = _lead(self.param("bias", nn.initializers.zeros, (d,), jnp.float32).astype(x.dtype), x.ndim)
    if self.rank:
      down = self.param("down", nn.initializers.zeros, (d, self.rank), jnp.float32).astype(x.dtype)
      up = self.param("up", nn.initializers.zeros, (self.rank, d), jnp.float32).astype(x.dtype)
      out = out + matmul(matmul(x, down), up)
    return out


# The residual stream between a block's attention and MLP sublayers: a tap of no linear, kept by the within-block
# sequential pass so that the block output needs no second run of the attention.
MID = "mid"


def tap(module: nn.Module, name: str, x):
  """Marks ``x`` as the input of the linears of group ``name``: sows it into the ``taps`` collection and returns
  it -- or, when the ``given`` collection holds ``name`` in this module's scope, returns that value instead (the
  within-block sequential pass feeds inputs computed with the block's already-pruned linears)."""
  if module.has_variable("given", name):
    x = module.get_variable("given", name)
  module.sow("taps", name, x)
  return x


def lm_logits(h, embedding, vocab_size: int):
  """LM head logits ``(..., vocab)``: the tied token embedding ``(vocab, d)`` when given, else an ``lm_head``
  Dense (call from inside a compact module)."""
  if embedding is None:
    return LMHead(vocab_size, name="lm_head")(h)
  return matmul(h, embedding.T.astype(h.dtype), compute_dtype(h.dtype))


class LMHead(nn.Module):
  """An untied LM head: ``nn.Dense(vocab, use_bias=False)``'s parameter (``kernel`` ``(d, vocab)``), logits
  ``(..., vocab)`` in :func:`compute_dtype`."""

  features: int

  @nn.compact
  def __call__(self, h):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (h.shape[-1], self.features), jnp.float32)
    return matmul(h, kernel.astype(h.dtype), compute_dtype(h.dtype))


class ConfigModule(nn.Module):
  """A part of a decoder configured by the model's ``config``."""

  config: ModelConfig


class BlockModule(ConfigModule):
  """A decoder layer: also its ``(attention, mlp)`` sublayer ``modes``."""

  modes: tuple[str, str] = ("full", "full")


SUBLAYERS = ("self_attn", "mlp")  # the residual sublayers of a block, in order
ADAPTER_NAMES = tuple(f"{name}_adapter" for name in SUBLAYERS)  # the params of their replacements


def sublayer(mode: str, rank: int, name: str, compute, x):
  """Applies a residual sublayer according to its ``mode``: returns the update added to ``x``."""
  if mode == "full":
    return compute(x)
  if mode == "skip":
    return jnp.zeros_like(x)
  return Adapter(rank=rank if mode == "lowrank" else 0, name=ADAPTER_NAMES[SUBLAYERS.index(name)])(x)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
  """Inverse frequencies ``(head_dim // 2,)`` with LLaMA-3 or linear ``rope_scaling`` applied."""
  d = config.head_dim
  dtype = jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless float64 is enabled
  inv = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=dtype) / d))
  scaling = dict(config.rope_scaling)
  kind = scaling.get("rope_type", "default")
  if kind == "linear":
    inv = inv / scaling["factor"]
  elif kind == "llama3":
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    inv = jnp.where(medium, smoothed, scaled)
  return inv


def rotary(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``cos, sin`` of shape ``(batch, seq, head_dim)`` for integer ``positions`` ``(batch, seq)``."""
  inv = rope_inv_freq(config)
  freqs = positions.astype(inv.dtype)[..., None] * inv[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x, cos, sin):
  """Rotates ``x`` ``(batch, seq, heads, head_dim)`` by ``cos, sin`` ``(batch, seq, head_dim)``."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def attention_mask(attention_mask: jax.Array | None, batch: int, seq: int,
                   window: int | None = None) -> jax.Array:
  """Boolean ``(batch, 1, seq, seq)``: query ``i`` may see key ``j``. Causal, padding-aware, optional window."""
  i = jnp.arange(seq)[:, None]
  j = jnp.arange(seq)[None, :]
  allowed = j <= i
  if window is not None:
    allowed = allowed & (i - j < window)
  allowed = jnp.broadcast_to(allowed, (batch, 1, seq, seq))
  if attention_mask is not None:
    allowed = allowed & attention_mask.astype(bool)[:, None, None, :]
  return allowed


def positions_from_mask(attention_mask: jax.Array | None, batch: int, seq: int) -> jax.Array:
  """Integer positions ``(batch, seq)``: 0.. for real tokens whatever the (left or right) padding."""
  if attention_mask is None:
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  m = attention_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0) * m


# The collection whose entry ``out`` in a linear's scope is added to that linear's output: zeros there make the
# gradient with respect to them the gradient with respect to the outputs (the curvature of LLM Surgeon).
DELTAS = "deltas"


class Linear(nn.Module):
  """``nn.Dense`` with the same parameter names, shapes and initialisers (``kernel`` ``(d_in, features)``,
  ``bias``), whose output also takes ``deltas/<scope>/out`` when that variable is given."""

  features: int
  use_bias: bool

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32) if self.use_bias else None
    y = dense(x, kernel, bias)
    if self.has_variable(DELTAS, "out"):
      y = y + self.get_variable(DELTAS, "out").astype(y.dtype)
    return y


def dense(x, kernel, bias=None):
  """What ``nn.Dense`` computes: ``x @ kernel + bias`` (``(..., d_in) @ (d_in, d_out)``) in the promoted dtype,
  accumulated in :func:`compute_dtype` at :func:`matmul_precision`."""
  x, kernel, bias = promote_dtype(x, kernel, bias)
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=matmul_precision(x.dtype),
                          preferred_element_type=compute_dtype(x.dtype)).astype(x.dtype)
  return y if bias is None else y + _lead(bias, y.ndim)


def tapped_projection(module: nn.Module, name: str, inner, linear: Linear, *xs):
  """``linear(tap(module, name, inner(*xs)))``: a sublayer's ``inner`` computation, then its output projection,
  whose input is the tap ``name``."""
  return linear(tap(module, name, inner(*xs)))


def dot_attention(q, k, v, mask, *, chunk: int = 128):
  """Scaled dot-product attention with grouped KV heads; scores, softmax and the weighted sum of values in
  :func:`compute_dtype`, products at :func:`matmul_precision`.

  ``q``: ``(b, t, h, d)``; ``k, v``: ``(b, t, kv, d)`` with ``h % kv == 0``; ``mask``: ``(b, 1, t, t)`` bool, which
  must be causal (query ``i`` never sees a key ``j > i``: every mask of :func:`attention_mask` is).
  Returns ``(b, t, h * d)``.

  Queries go in chunks of ``chunk``; chunk ``[lo, hi)`` is scored against keys ``[0, hi)`` only, which the causal
  mask allows, so about half of the score matrix is never computed. The query heads sharing a KV head are
  stacked into one matrix product per KV head. A fully masked query row (a padding position, whose output
  nothing reads) gets a finite average of values, never NaN.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  groups = h // kv
  wide = compute_dtype(q.dtype)
  q = (q.astype(wide) / math.sqrt(d)).astype(q.dtype)
  q = q.reshape(b, t, kv, groups, d).transpose(0, 2, 1, 3, 4)  # (b, kv, t, groups, d)
  k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # (b, kv, d, t), (b, kv, t, d)
  outs = []
  for lo in range(0, t, chunk):
    hi = min(lo + chunk, t)
    rows = q[:, :, lo:hi].reshape(b, kv, (hi - lo) * groups, d)
    scores = matmul(rows, k[..., :hi], wide).reshape(b, kv, hi - lo, groups, hi)
    allowed = mask[:, :, lo:hi, None, :hi]  # (b, 1, rows, 1, keys)
    scores = jnp.where(allowed, scores, jnp.finfo(wide).min)
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = matmul(weights.astype(v.dtype).reshape(b, kv, (hi - lo) * groups, hi), v[:, :, :hi], wide)
    outs.append((out.reshape(b, kv, hi - lo, groups, d) / total).astype(v.dtype))
  out = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
  return out.transpose(0, 2, 1, 3, 4).reshape(b, t, h * d)
