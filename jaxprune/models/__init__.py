"""LLaMA-family and OPT decoders in Flax, and the functional API the runner calls.

Params are ``{"embed": ..., "layers": [block params, ...], "head": ...}`` with Hugging Face names; Flax kernels
are ``(d_in, d_out)``, and :func:`to_hf_layout` / :func:`from_hf_layout` are the one place the layout changes.
Models know nothing of pruning or hardware: a block can return the inputs of its linears (taps).
"""
from jaxprune.models._config import ModelConfig, from_hf_config, to_hf_config
from jaxprune.models._convert import from_hf_layout, params_from_hf, params_to_hf, to_hf_layout
from jaxprune.models._model import (
    Params, abstract_params, block, context, embed, forward, head, init_params, linear_groups, tap_order)

__all__ = [
    "ModelConfig", "Params", "abstract_params", "block", "context", "embed", "forward", "from_hf_config",
    "from_hf_layout", "head", "init_params", "linear_groups", "params_from_hf", "params_to_hf", "tap_order",
    "to_hf_config", "to_hf_layout",
]
