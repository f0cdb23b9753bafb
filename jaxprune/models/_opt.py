"""OPT decoder (Zhang et al. 2022) in Flax: learned positions (offset 2), pre- or post-LayerNorm, ReLU MLP,
biases, and ``project_in``/``project_out`` when ``word_embed_proj_dim != hidden_size`` (OPT-350m).

Parameter names equal the Hugging Face names; ``Dense`` kernels are ``(d_in, d_out)``.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax

from jaxprune.models._config import ModelConfig
from jaxprune.models._layers import (MID, BlockModule, ConfigModule, Context, Linear, dot_attention, lm_logits,
                                    sublayer, tap, tapped_projection)

POSITION_OFFSET = 2

LINEAR_GROUPS = {
    "attn_in": ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
    "o_in": ("self_attn/out_proj",),
    "mlp_in": ("fc1",),
    "down_in": ("fc2",),
}


def _norm(config: ModelConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.norm_eps, use_bias=config.norm_affine, use_scale=config.norm_affine,
                      name=name)


class Attention(ConfigModule):
  @nn.compact
  def __call__(self, x, ctx: Context):
    c = self.config
    x = tap(self, "attn_in", x)
    projections = [Linear(c.num_heads * c.head_dim, c.qkv_bias, name=f"{name}_proj") for name in "qkv"]
    out_proj = Linear(c.hidden_size, c.o_bias, name="out_proj")

    def attend(x, mask):
      shape = (*x.shape[:2], c.num_heads, c.head_dim)
      return dot_attention(*(proj(x).reshape(shape) for proj in projections), mask)

    return tapped_projection(self, "o_in", attend, out_proj, x, ctx.mask)


class Block(BlockModule):
  """One OPT decoder layer. ``h``: ``(batch, seq, hidden)``. A removed post-LN sublayer takes its norm along."""

  @nn.compact
  def __call__(self, h, ctx: Context):
    c = self.config
    attn = lambda x: Attention(c, name="self_attn")(x, ctx)  # noqa: E731
    h = tap(self, MID, self._residual(h, self.modes[0], "self_attn", "self_attn_layer_norm", attn))
    return self._residual(h, self.modes[1], "mlp", "final_layer_norm", self._mlp)

  def _residual(self, h, mode, name, norm_name, compute):
    c = self.config
    if c.pre_norm:
      norm = _norm(c, norm_name)
      return h + sublayer(mode, c.adapter_rank, name, lambda x: compute(norm(x)), h)
    if mode == "full":
      return _norm(c, norm_name)(h + compute(h))
    return h + sublayer(mode, c.adapter_rank, name, compute, h)

  def _mlp(self, x):
    c = self.config
    x = tap(self, "mlp_in", x)
    fc1 = Linear(c.intermediate_size, c.mlp_bias, name="fc1")
    fc2 = Linear(c.hidden_size, c.mlp_bias, name="fc2")
    act = jax.nn.relu if c.activation == "relu" else functools.partial(jax.nn.gelu, approximate=False)
    return tapped_projection(self, "down_in", lambda x: act(fc1(x)), fc2, x)


class Embed(ConfigModule):
  @nn.compact
  def __call__(self, tokens, positions):
    c = self.config
    dim = c.word_embed_proj_dim or c.hidden_size
    h = nn.Embed(c.vocab_size, dim, name="embed_tokens")(tokens)
    if c.word_embed_proj_dim:
      h = nn.Dense(c.hidden_size, use_bias=False, name="project_in")(h)
    pos = nn.Embed(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size, name="embed_positions")
    return h + pos(positions + POSITION_OFFSET)


class Head(ConfigModule):
  """Final LayerNorm (pre-LN models), ``project_out``, and the LM head tied to the token embedding."""

  @nn.compact
  def __call__(self, h, embedding=None):
    c = self.config
    if c.pre_norm:
      h = _norm(c, "final_layer_norm")(h)
    if c.word_embed_proj_dim:
      h = nn.Dense(c.word_embed_proj_dim, use_bias=False, name="project_out")(h)
    return lm_logits(h, embedding if c.tie_word_embeddings else None, c.vocab_size)
