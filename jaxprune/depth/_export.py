"""Sublayer edits rewritten as plain layers, so that a Hugging Face model computes them exactly.

A Hugging Face LLaMA (or pre-norm OPT) layer always has both sublayers, so a removed one is expressed by
weights: ``skip`` -> every weight of the sublayer zero (attention with zero ``q, k, v`` averages zero values;
the MLP of zero inputs is zero), ``bias`` -> the same with the adapter's bias as the output projection's bias
(``o_proj``/``down_proj``; ``out_proj``/``fc2`` in OPT), which needs the model's attention or MLP biases turned
on (zero everywhere else). A ``lowrank`` adapter has no Hugging Face equivalent and is refused. Blocks removed
without recovery need nothing: they are already gone from the model.
"""
from __future__ import annotations

import json

import numpy as np

from jaxprune import _tree as tree
from jaxprune.errors import JaxpruneError
from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig
from jaxprune.models._layers import ADAPTER_NAMES

def _bias_config(config: ModelConfig, needs_attn: bool, needs_mlp: bool) -> ModelConfig:
  """``config`` with the output-projection biases that ``bias`` adapters need turned on (refused if impossible)."""
  hf = json.loads(config.hf_config_json)
  model_type = hf.get("model_type", config.family)
  if config.family == "opt":
    if (needs_attn and not config.o_bias) or (needs_mlp and not config.mlp_bias):
      raise JaxpruneError("bias adapters cannot be exported to an OPT model without biases (enable_bias=false)")
    return config
  if (needs_attn or needs_mlp) and model_type != "llama":
    raise JaxpruneError(f"bias adapters cannot be exported to a Hugging Face {model_type} model "
                        "(only llama has attention_bias/mlp_bias); keep the jaxprune checkpoint")
  changes = {}
  if needs_attn:  # Hugging Face's attention_bias turns on the q, k, v and o biases together
    changes.update(qkv_bias=True, o_bias=True)
    hf["attention_bias"] = True
  if needs_mlp:
    changes["mlp_bias"] = True
    hf["mlp_bias"] = True
  return config.replace(**changes, hf_config_json=json.dumps(hf, sort_keys=True))


def _fill(abstract, block: dict) -> dict:
  """A full block of ``abstract``'s structure: values from ``block`` where present, else zeros (norm scales 1)."""
  def leaf(path, like):
    node = tree.get(block, tree.SEP.join(path))
    if node is not None:
      return np.asarray(node, np.float32)
    return np.full(like.shape, 1.0 if path[-1] == "scale" else 0.0, np.float32)

  return tree.unflatten({tree.SEP.join(path): leaf(path, like) for path, like in tree.items(abstract)})


def hf_compatible(config: ModelConfig, params) -> tuple[ModelConfig, dict]:
  """``(config, params)`` without sublayer edits that compute the same function (see module docstring).

  Raises :class:`~jaxprune.errors.JaxpruneError` for ``lowrank`` adapters, post-norm OPT, and bias adapters a
  target model family cannot hold.
  """
  modes = [config.sublayer_modes(i) for i in range(config.num_layers)]
  if all(m == ("full", "full") for m in modes):
    return config, params
  if any("lowrank" in m for m in modes):
    raise JaxpruneError("lowrank adapters cannot be expressed in a Hugging Face model; "
                        "keep the jaxprune checkpoint or use --recover bias")
  if config.family == "opt" and not config.pre_norm:
    raise JaxpruneError("removed sublayers of a post-norm OPT model cannot be exported (the norm goes with them)")
  new = _bias_config(config, any(m[0] == "bias" for m in modes), any(m[1] == "bias" for m in modes))
  new = new.replace(sublayers=(), adapter_rank=0)
  groups = M.linear_groups(config)
  outputs = (groups["o_in"][0], groups["down_in"][0])
  abstract = M.abstract_params(new)["layers"]
  layers = []
  for i, (block, mode) in enumerate(zip(params["layers"], modes)):
    full = _fill(abstract[i], {k: v for k, v in block.items() if k not in ADAPTER_NAMES})
    for sub in (0, 1):
      if mode[sub] == "bias":
        full = tree.set_at(full, f"{outputs[sub]}/bias", np.asarray(block[ADAPTER_NAMES[sub]]["bias"], np.float32))
    layers.append(full)
  return new, {**params, "layers": layers}
