"""LLaMA-family decoder (LLaMA 1/2/3, Mistral, Qwen2, Qwen3, SmolLM) in Flax.

Parameter names equal the Hugging Face names; ``Dense`` kernels are ``(d_in, d_out)`` (see ``jaxprune.models._convert``
for the one place where the layout changes). A block can ``sow`` the inputs of its linears into the ``taps``
collection, keyed by the group of linears that read them.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from jaxprune.models._layers import (MID, BlockModule, ConfigModule, Context, Linear, RMSNorm, apply_rotary,
                                    dot_attention, lm_logits, sublayer, tap, tapped_projection)

# Input tap -> the linears (paths inside a block) that read it.
LINEAR_GROUPS = {
    "attn_in": ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
    "o_in": ("self_attn/o_proj",),
    "mlp_in": ("mlp/gate_proj", "mlp/up_proj"),
    "down_in": ("mlp/down_proj",),
}


class Attention(ConfigModule):
  """Grouped-query attention with RoPE. With ``config.qk_norm`` (Qwen3) each head's queries and keys
  ``(b, t, heads, head_dim)`` go through an RMSNorm over ``head_dim`` (``q_norm``, ``k_norm``: scales, not linears)
  between the projection and RoPE."""

  @nn.compact
  def __call__(self, x, ctx: Context):
    c = self.config
    x = tap(self, "attn_in", x)
    q_proj, k_proj, v_proj = (Linear(n * c.head_dim, c.qkv_bias, name=f"{name}_proj")
                              for name, n in (("q", c.num_heads), ("k", c.num_kv_heads), ("v", c.num_kv_heads)))
    o_proj = Linear(c.hidden_size, c.o_bias, name="o_proj")
    q_norm, k_norm = (RMSNorm(c.norm_eps, name=f"{name}_norm") for name in "qk")

    def attend(x, cos, sin, mask):
      b, t, _ = x.shape
      q = q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
      k = k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
      if c.qk_norm:
        q, k = q_norm(q), k_norm(k)
      q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
      return dot_attention(q, k, v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim), mask)

    return tapped_projection(self, "o_in", attend, o_proj, x, ctx.cos, ctx.sin, ctx.mask)


class MLP(ConfigModule):
  @nn.compact
  def __call__(self, x):
    c = self.config
    x = tap(self, "mlp_in", x)
    gate = Linear(c.intermediate_size, c.mlp_bias, name="gate_proj")
    up = Linear(c.intermediate_size, c.mlp_bias, name="up_proj")
    down = Linear(c.hidden_size, c.mlp_bias, name="down_proj")
    return tapped_projection(self, "down_in", lambda x: jax.nn.silu(gate(x)) * up(x), down, x)


class Block(BlockModule):
  """One decoder layer. ``h``: ``(batch, seq, hidden)``; ``modes``: (attention, mlp) sublayer modes."""

  @nn.compact
  def __call__(self, h, ctx: Context):
    c = self.config
    attn_norm = RMSNorm(c.norm_eps, name="input_layernorm")
    h = h + sublayer(self.modes[0], c.adapter_rank, "self_attn",
                     lambda x: Attention(c, name="self_attn")(attn_norm(x), ctx), h)
    h = tap(self, MID, h)
    mlp_norm = RMSNorm(c.norm_eps, name="post_attention_layernorm")
    return h + sublayer(self.modes[1], c.adapter_rank, "mlp", lambda x: MLP(c, name="mlp")(mlp_norm(x)), h)


class Embed(ConfigModule):
  @nn.compact
  def __call__(self, tokens):
    c = self.config
    return nn.Embed(c.vocab_size, c.hidden_size, name="embed_tokens")(tokens)


class Head(ConfigModule):
  """Final norm and LM head; with tied embeddings the head is the embedding matrix."""

  @nn.compact
  def __call__(self, h, embedding=None):
    c = self.config
    h = RMSNorm(c.norm_eps, name="norm")(h)
    return lm_logits(h, embedding if c.tie_word_embeddings else None, c.vocab_size)
