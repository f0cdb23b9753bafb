"""GGUF files (llama.cpp) in: dequantized with the ``gguf`` package, no torch needed.

Architectures, read as transformers' GGUF loader reads them:

- ``llama`` (LLaMA 1/2/3, SmolLM; Mistral, which llama.cpp writes as ``llama`` with "mistral" in ``general.name``
  and which is read as a Hugging Face ``mistral`` model):
  llama.cpp's converter permutes the rows of ``q`` and ``k`` for its rotary layout; :func:`unpermute` undoes it
  so the weights equal the Hugging Face ones. GGUF stores no sliding window: attention is full, as llama.cpp
  computes it.
- ``qwen2``: attention biases on ``q``, ``k``, ``v``; untied heads (``output.weight``); no permutation.
- ``qwen3``: per-head RMSNorm of queries and keys (``attn_q_norm``/``attn_k_norm``, read as ``self_attn.q_norm``
  and ``self_attn.k_norm``); no permutation; attention biases (on q, k, v and o, as Hugging Face's
  ``attention_bias``) when the file has ``attn_q.bias``, none in Qwen3's own files.

The size of a head is ``attention.key_length``, which llama.cpp writes from a config's ``head_dim`` (Qwen3's,
128, is not ``embedding_length / head_count``), else ``rope.dimension_count``, else ``embedding_length /
head_count``; RoPE must rotate whole heads. (transformers' GGUF loader reads no head size for ``qwen3`` and keeps
``Qwen3Config``'s default 128, which every Qwen3 model has.)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxprune._memory import host_empty
from jaxprune.errors import JaxpruneError
from jaxprune.io._stream import streamed_params, timed
from jaxprune.models._config import ModelConfig, from_hf_config
from jaxprune.models._convert import params_from_hf
from jaxprune.models._model import Params

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
_PERMUTED = ("llama",)  # architectures whose q/k rows llama.cpp permutes
_HF_NAMES = {"llama": ("llama", "LlamaForCausalLM"), "mistral": ("mistral", "MistralForCausalLM"),
             "qwen2": ("qwen2", "Qwen2ForCausalLM"), "qwen3": ("qwen3", "Qwen3ForCausalLM")}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's rotary row permutation of a ``q``/``k`` weight ``(n_head * head_dim, d_in)``."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reader(path: Path):
  import gguf

  try:
    return gguf.GGUFReader(str(path))
  except Exception as err:  # corrupt or truncated file
    raise JaxpruneError(f"{path} is not a readable GGUF file: {err}") from None


def _field(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _number(reader, path: Path, key: str, kind=int, default=None):
  """Field ``key`` as ``kind``; a missing field without ``default``, or a value of the wrong type, is one line."""
  value = _field(reader, key, default)
  try:
    return kind(value)
  except (TypeError, ValueError):
    what = "lacks" if value is None else f"has a non-numeric {value!r} in"
    raise JaxpruneError(f"{path}: GGUF file {what} field {key}") from None


def _architecture(reader, path: Path) -> str:
  arch = _field(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHS:
    raise JaxpruneError(f"{path}: GGUF architecture {arch!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_ARCHS)})")
  return arch


def gguf_hf_config(reader, path: Path) -> dict:
  """The Hugging Face config dict equivalent to a GGUF file's metadata."""
  arch = _architecture(reader, path)
  model_type = arch
  if arch == "llama" and "mistral" in str(_field(reader, "general.name", "")).lower():
    model_type = "mistral"
  names = {t.name for t in reader.tensors}
  heads = _number(reader, path, f"{arch}.attention.head_count")
  hidden = _number(reader, path, f"{arch}.embedding_length")
  vocab = _field(reader, f"{arch}.vocab_size")
  if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
  hf = {
      "model_type": _HF_NAMES[model_type][0], "vocab_size": _number(reader, path, f"{arch}.vocab_size", int, vocab),
      "hidden_size": hidden, "intermediate_size": _number(reader, path, f"{arch}.feed_forward_length"),
      "num_hidden_layers": _number(reader, path, f"{arch}.block_count"), "num_attention_heads": heads,
      "num_key_value_heads": _number(reader, path, f"{arch}.attention.head_count_kv", int, heads),
      "head_dim": _head_dim(reader, path, arch, hidden // heads),
      "max_position_embeddings": _number(reader, path, f"{arch}.context_length", int, 2048),
      "rms_norm_eps": _number(reader, path, f"{arch}.attention.layer_norm_rms_epsilon", float, 1e-6),
      "rope_theta": _number(reader, path, f"{arch}.rope.freq_base", float, 10000.0),
      "tie_word_embeddings": "output.weight" not in names, "hidden_act": "silu",
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
      "architectures": [_HF_NAMES[model_type][1]],
  }
  if model_type == "mistral":
    hf["sliding_window"] = None
  if model_type == "qwen3":
    hf["attention_bias"] = "blk.0.attn_q.bias" in names
  scaling = _field(reader, f"{arch}.rope.scaling.type")
  if scaling not in (None, "none"):
    if scaling != "linear":
      raise JaxpruneError(f"{path}: GGUF rope scaling {scaling!r} is not supported")
    hf["rope_scaling"] = {"rope_type": "linear",
                          "factor": _number(reader, path, f"{arch}.rope.scaling.factor", float)}
  return hf


def _head_dim(reader, path: Path, arch: str, default: int) -> int:
  """The size of a head: ``attention.key_length``, else ``rope.dimension_count``, else ``default``; refuses value
  heads of another size and RoPE over part of a head (neither is in jaxprune's model)."""
  key = _number(reader, path, f"{arch}.attention.key_length", int, 0)
  value = _number(reader, path, f"{arch}.attention.value_length", int, key)
  rotated = _number(reader, path, f"{arch}.rope.dimension_count", int, 0)
  head = key or rotated or default
  if value != key:
    raise JaxpruneError(f"{path}: GGUF key and value heads of different sizes ({key} and {value}) are not supported")
  if rotated and rotated != head:
    raise JaxpruneError(f"{path}: GGUF RoPE over {rotated} of each head's {head} dimensions is not supported")
  return head


def _hf_tensor_name(gguf_name: str) -> str:
  stem, kind = gguf_name.rsplit(".", 1)
  if stem.startswith("blk."):
    _, layer, part = stem.split(".", 2)
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
  return f"{_GLOBAL_NAMES[stem]}.{kind}"


def _source_dtype(reader) -> str:
  """The float dtype of the file's matrices (``float32`` for quantized ones: they are dequantized to it)."""
  import gguf

  kinds = {t.tensor_type for t in reader.tensors if len(t.shape) == 2}
  names = {gguf.GGMLQuantizationType.F16: "float16", gguf.GGMLQuantizationType.BF16: "bfloat16"}
  return names[kinds.pop()] if len(kinds) == 1 and next(iter(kinds)) in names else "float32"


def load_gguf(path: Path, dtype=None) -> tuple[ModelConfig, Params]:
  """Config and dequantized params of a GGUF file (q/k row permutation undone)."""
  config, params, _ = read_gguf(path, dtype)
  return config, params


def read_gguf(path: Path, dtype=None, *, stream: bool = False) -> tuple[ModelConfig, Params, dict]:
  """Config, dequantized params (q/k row permutation undone), and ``{"source_dtype": ...}`` of a GGUF file; the
  params in ``dtype``, float32 by default whatever the file stores (quantized blocks dequantize to float32).

  ``stream``: the blocks are a :class:`~jaxprune.io._stream.Blocks`, each tensor read by byte range from the file
  and dequantized when its block is used (not through the reader's memory map, whose touched pages would stay
  resident)."""
  import gguf

  reader = _reader(path)
  config = from_hf_config(gguf_hf_config(reader, path))
  permuted = _field(reader, "general.architecture") in _PERMUTED
  tensors = {}
  for t in reader.tensors:
    if t.name == "rope_freqs.weight":
      raise JaxpruneError(f"{path}: GGUF per-frequency rope factors (rope_freqs, as in LLaMA 3.1 files) are not "
                          "supported")
    try:
      tensors[_hf_tensor_name(t.name)] = t
    except (KeyError, ValueError):
      raise JaxpruneError(f"{path}: unexpected GGUF tensor {t.name!r}") from None

  def raw(t) -> np.ndarray:
    if not stream:
      return t.data
    out = host_empty(t.data.shape, t.data.dtype)  # the shape and dtype of the memory map, without touching it
    with timed("read"), open(path, "rb") as f:
      got = os.preadv(f.fileno(), [memoryview(out.reshape(-1).view(np.uint8))], t.data_offset)
    if got != out.nbytes:
      raise JaxpruneError(f"{path} is not a readable GGUF file: tensor {t.name} is cut short")
    return out

  def get(name: str) -> np.ndarray:
    t = tensors[name]
    w = np.asarray(gguf.quants.dequantize(raw(t), t.tensor_type), dtype=np.float32)
    w = w.reshape([int(n) for n in reversed(t.shape)])
    if permuted and name.endswith("q_proj.weight"):
      w = unpermute(w, config.num_heads)
    elif permuted and name.endswith("k_proj.weight"):
      w = unpermute(w, config.num_kv_heads)
    return w

  dtype = np.float32 if dtype is None else dtype
  if stream:
    where = lambda name: (path, tensors[name].data_offset, tensors[name].n_bytes)  # noqa: E731
    params = streamed_params(get, set(tensors), config, np.dtype(dtype), path, where=where)
  else:
    params = params_from_hf(get, set(tensors), config, dtype)
  return config, params, {"source_dtype": _source_dtype(reader)}


def load_gguf_tokenizer(path: Path):
  """The tokenizer stored in a GGUF file's metadata, as a Hugging Face fast tokenizer.

  Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``, as in SmolLM, GPT-2, LLaMA-3 and Qwen2 files)
  are rebuilt here with the ``tokenizers`` library, without torch; other kinds go through transformers' own GGUF
  reader (which needs torch).
  """
  reader = _reader(path)
  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
  tok = Tokenizer(bpe)
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  special = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind in (3, 4)]
  tok.add_special_tokens(special)
  names = {}
  for role in ("bos", "eos", "unknown", "padding"):
    token_id = _field(reader, f"tokenizer.ggml.{role}_token_id")
    if token_id is not None:
      names[{"unknown": "unk_token", "padding": "pad_token"}.get(role, f"{role}_token")] = tokens[int(token_id)]
  return PreTrainedTokenizerFast(tokenizer_object=tok, **names)
