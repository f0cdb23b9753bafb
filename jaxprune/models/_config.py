"""One frozen, hashable description of a decoder-only LM, converted to and from Hugging Face configs.

The converter is an allowlist (as in penzai): every Hugging Face config attribute is either understood,
known to be irrelevant for inference, or refused by name.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxprune.errors import JaxpruneError

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUBLAYER_MODES = ("full", "skip", "bias", "lowrank")

# Attributes that do not change what a causal-LM forward pass computes in eval mode.
_IRRELEVANT = frozenset({
    "architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "dtype", "torch_dtype", "transformers_version", "initializer_range",
    "init_std", "use_cache", "attention_dropout", "dropout", "activation_dropout", "layerdrop",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "_name_or_path", "model_type",
    "tokenizer_class", "prefix", "task_specific_params", "_remove_final_layer_norm", "is_decoder",
    "add_cross_attention", "tie_encoder_decoder", "use_bfloat16", "pruned_heads", "torchscript",
    "finetuning_task", "max_window_layers", "bad_words_ids", "quantization_config", "_attn_implementation",
    "_commit_hash", "transformers.js_config", "_model_name_or_path", "unk_token_id", "keys_to_ignore_at_inference",
    "_attn_implementation_autoset", "classifier_dropout", "embd_pdrop", "resid_pdrop", "hidden_dropout",
    "tf_legacy_loss", "use_return_dict", "gradient_checkpointing", "base_model_tp_plan", "base_model_pp_plan",
})
# What a model's layer_types may name (Qwen2, Qwen3, Mistral and LLaMA in transformers 5 write it).
_LAYER_KINDS = ("full_attention", "sliding_attention")
# Keys without which a config cannot be built, per family.
_REQUIRED = {
    "llama": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    "opt": ("vocab_size", "hidden_size", "ffn_dim", "num_hidden_layers", "num_attention_heads"),
}
_LLAMA_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias",
    "pretraining_tp", "sliding_window", "use_sliding_window", "layer_types",
})
_OPT_KEYS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "max_position_embeddings",
    "do_layer_norm_before", "word_embed_proj_dim", "num_attention_heads", "activation_function",
    "enable_bias", "layer_norm_elementwise_affine", "tie_word_embeddings",
})
_ROPE_TYPES = ("default", "linear", "llama3")
# Model types whose layers may use a sliding window set per layer (layer_types, or use_sliding_window from
# max_window_layers on).
_PER_LAYER_WINDOW_TYPES = ("qwen2", "qwen3")
# Hugging Face architecture (class) of each model type jaxprune exports.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "opt": "OPTForCausalLM"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a LLaMA-family (LLaMA, Mistral, Qwen2, Qwen3) or OPT decoder.

  ``sublayers`` records, per layer, how the attention and MLP sublayers are computed: ``"full"``, ``"skip"``
  (removed), ``"bias"`` (replaced by a learned additive bias) or ``"lowrank"`` (replaced by a low-rank linear
  adapter of rank ``adapter_rank``). Empty means every sublayer is ``"full"``.

  ``layer_widths`` records, per layer, ``(intermediate_size, num_heads, num_kv_heads)`` of a structurally pruned
  model whose layers lost MLP units or whole groups of heads (:mod:`jaxprune.models._compact`); empty means every
  layer has the uniform widths above, which stay those of the model it came from (export pads back to them).
  """

  family: str  # "llama" or "opt"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  tie_word_embeddings: bool
  norm_eps: float = 1e-6
  # LLaMA family.
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  # RMSNorm of each head's queries and keys (scales ``(head_dim,)``, the model's ``norm_eps``) after the q/k
  # projections and before RoPE: Qwen3's ``q_norm``/``k_norm``.
  qk_norm: bool = False
  # OPT.
  pre_norm: bool = True
  word_embed_proj_dim: int | None = None
  norm_affine: bool = True
  activation: str = "silu"
  # Structure edits (depth pruning).
  sublayers: tuple[tuple[str, str], ...] = ()
  adapter_rank: int = 0
  # Structure edits (structured pruning): per layer (intermediate_size, num_heads, num_kv_heads).
  layer_widths: tuple[tuple[int, int, int], ...] = ()
  # The original Hugging Face config, as JSON, so export writes back what it read.
  hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

  def sublayer_modes(self, layer: int) -> tuple[str, str]:
    """``(attention_mode, mlp_mode)`` of ``layer``."""
    return self.sublayers[layer] if self.sublayers else ("full", "full")

  def widths(self, layer: int) -> tuple[int, int, int]:
    """``(intermediate_size, num_heads, num_kv_heads)`` of ``layer``."""
    return self.layer_widths[layer] if self.layer_widths else (self.intermediate_size, self.num_heads,
                                                               self.num_kv_heads)

  def for_layer(self, layer: int) -> ModelConfig:
    """The config one block of ``layer`` is built from: that layer's widths, no per-layer records."""
    inter, heads, kv = self.widths(layer)
    return self.replace(intermediate_size=inter, num_heads=heads, num_kv_heads=kv, layer_widths=())

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> ModelConfig:
    d = json.loads(text)
    d["rope_scaling"] = tuple((k, v) for k, v in d["rope_scaling"])
    d["sublayers"] = tuple(tuple(s) for s in d["sublayers"])
    d["layer_widths"] = tuple(tuple(w) for w in d.get("layer_widths", ()))
    return cls(**d)


def _check_allowlist(hf: dict, allowed: frozenset, model_type: str) -> None:
  unknown = sorted(k for k, v in hf.items() if k not in allowed and k not in _IRRELEVANT and v not in (None, False))
  if unknown:
    raise JaxpruneError(f"unsupported {model_type} config attributes: {', '.join(unknown)}")


def _check_required(hf: dict, family: str, model_type: str) -> None:
  missing = [k for k in _REQUIRED[family] if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool)]
  if missing:
    raise JaxpruneError(f"{model_type} config lacks integer {', '.join(missing)}")


def _attention_window(hf: dict, model_type: str) -> int | None:
  """The sliding window of every layer, or None for full attention, as transformers computes it: Mistral uses
  ``sliding_window`` everywhere; Qwen2 and Qwen3 per layer (``layer_types``, else sliding from
  ``max_window_layers`` on, when ``use_sliding_window``); LLaMA has none. Mixed or unknown layer kinds are
  refused."""
  if model_type == "mistral":
    return hf.get("sliding_window")
  if model_type not in _PER_LAYER_WINDOW_TYPES:
    return None
  window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
  kinds = hf.get("layer_types")
  if kinds is None:
    first = hf.get("max_window_layers", hf["num_hidden_layers"])
    kinds = ["sliding_attention" if window is not None and i >= first else "full_attention"
             for i in range(hf["num_hidden_layers"])]
  unknown = sorted(set(map(str, kinds)) - set(_LAYER_KINDS))
  if unknown:
    raise JaxpruneError(f"unsupported config: layer_types {', '.join(unknown)} (supported: full attention, or one "
                        "sliding window in every layer)")
  if set(kinds) == {"full_attention"}:
    return None
  if len(set(kinds)) > 1 or window is None:
    raise JaxpruneError("unsupported config: mixed full and sliding-window attention layers (layer_types)")
  return window


def _rope(hf: dict) -> tuple[float, tuple[tuple[str, Any], ...]]:
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = params.pop("rope_type", params.pop("type", "default"))
  if rope_type not in _ROPE_TYPES:
    raise JaxpruneError(f"unsupported rope type {rope_type!r}; supported: {', '.join(_ROPE_TYPES)}")
  if rope_type == "default":
    return theta, ()
  params.pop("partial_rotary_factor", None)
  return theta, (("rope_type", rope_type),) + tuple(sorted(params.items()))


def from_hf_config(hf: dict) -> ModelConfig:
  """Builds a :class:`ModelConfig` from a Hugging Face ``config.json`` dict; refuses what it cannot compute."""
  model_type = hf.get("model_type")
  raw = json.dumps(hf, sort_keys=True, default=str)
  if model_type in LLAMA_TYPES:
    _check_allowlist(hf, _LLAMA_KEYS, model_type)
    _check_required(hf, "llama", model_type)
    if hf.get("pretraining_tp", 1) not in (1, None):
      raise JaxpruneError("unsupported llama config attribute: pretraining_tp != 1")
    if hf.get("hidden_act", "silu") != "silu":
      raise JaxpruneError(f"unsupported hidden_act {hf['hidden_act']!r} (only silu)")
    heads = hf["num_attention_heads"]
    theta, scaling = _rope(hf)
    window = _attention_window(hf, model_type)
    qkv_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
    return ModelConfig(
        family="llama", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, qkv_bias=qkv_bias,
        o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), sliding_window=window, qk_norm=model_type == "qwen3",
        hf_config_json=raw)
  if model_type == "opt":
    _check_allowlist(hf, _OPT_KEYS, model_type)
    _check_required(hf, "opt", model_type)
    act = hf.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
      raise JaxpruneError(f"unsupported OPT activation_function {act!r} (relu or gelu)")
    heads = hf["num_attention_heads"]
    proj = hf.get("word_embed_proj_dim") or hf["hidden_size"]
    return ModelConfig(
        family="opt", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["ffn_dim"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=heads,
        head_dim=hf["hidden_size"] // heads, max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), norm_eps=1e-5,
        pre_norm=bool(hf.get("do_layer_norm_before", True)),
        word_embed_proj_dim=proj if proj != hf["hidden_size"] else None,
        norm_affine=bool(hf.get("layer_norm_elementwise_affine", True)), activation=act,
        qkv_bias=bool(hf.get("enable_bias", True)), o_bias=bool(hf.get("enable_bias", True)),
        mlp_bias=bool(hf.get("enable_bias", True)), hf_config_json=raw)
  raise JaxpruneError(
      f"unsupported model type {model_type!r}; supported: {', '.join(LLAMA_TYPES + ('opt',))}")


def to_hf_config(config: ModelConfig) -> dict:
  """The Hugging Face ``config.json`` dict of ``config`` (layer count and sizes updated after pruning)."""
  hf = json.loads(config.hf_config_json)
  if not hf:
    hf = {"model_type": "opt" if config.family == "opt" else "qwen3" if config.qk_norm else "llama"}
  if config.family == "llama" and config.qk_norm != (hf["model_type"] == "qwen3"):
    has = "with" if config.qk_norm else "without"
    raise JaxpruneError(f"cannot export a {hf['model_type']} model {has} q/k norms: Hugging Face computes them in "
                        "model_type qwen3 only, and always there")
  hf.update(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=config.tie_word_embeddings)
  if config.family == "llama":
    hf.update(intermediate_size=config.intermediate_size, num_key_value_heads=config.num_kv_heads,
              head_dim=config.head_dim, rms_norm_eps=config.norm_eps)
    # transformers 5 reads rope_parameters, 4.x rope_theta and rope_scaling (whose validation warns about any key
    # its rope type does not take, rope_theta included): both are written.
    scaling = {"rope_type": "default", **dict(config.rope_scaling)}
    hf["rope_parameters"] = {**scaling, "rope_theta": config.rope_theta}
    hf["rope_theta"] = config.rope_theta
    hf["rope_scaling"] = None if scaling["rope_type"] == "default" else scaling
    if hf["model_type"] == "llama":
      hf["attention_bias"] = config.qkv_bias
      hf["mlp_bias"] = config.mlp_bias
    elif hf["model_type"] == "qwen3":
      if config.qkv_bias != config.o_bias:
        raise JaxpruneError("cannot export a qwen3 model with biases on q, k, v but not o_proj, or the reverse: its "
                            "attention_bias puts one on all four")
      hf["attention_bias"] = config.qkv_bias
  else:
    hf.update(ffn_dim=config.intermediate_size, do_layer_norm_before=config.pre_norm)
  hf["architectures"] = [_ARCHITECTURES[hf["model_type"]]]
  return hf
