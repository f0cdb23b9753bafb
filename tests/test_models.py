"""Parity of the Flax models with transformers' PyTorch models on tiny random configs built in memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jitted

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxprune.errors import JaxpruneError  # noqa: E402
from jaxprune.models import _model as M  # noqa: E402
from jaxprune.models._config import from_hf_config  # noqa: E402
from jaxprune.models._convert import params_from_hf, params_to_hf  # noqa: E402
from jaxprune.models._layers import MID  # noqa: E402

TOL = 1e-4  # max abs error, float32; never loosened

_LLAMA = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=64, rms_norm_eps=1e-5)
_OPT = dict(vocab_size=101, hidden_size=48, ffn_dim=80, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64)

CASES = {
    "llama-mha-untied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-gqa-tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mqa": ("llama", dict(num_key_value_heads=1)),
    "llama-attention-bias": ("llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "llama3-rope-scaling": ("llama", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "linear-rope-scaling": ("llama", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "qwen2-qkv-bias": ("qwen2", dict(num_key_value_heads=2, use_sliding_window=False)),
    "opt-pre-ln": ("opt", dict(do_layer_norm_before=True)),
    "opt-post-ln": ("opt", dict(do_layer_norm_before=False)),
    "opt-project-in-out": ("opt", dict(word_embed_proj_dim=32)),
}


def build_hf(case: str):
  kind, extra = CASES[case]
  torch.manual_seed(0)
  if kind == "opt":
    cfg = transformers.OPTConfig(**_OPT, **extra)
    model = transformers.OPTForCausalLM(cfg)
  elif kind == "qwen2":
    cfg = transformers.Qwen2Config(**_LLAMA, **extra)
    model = transformers.Qwen2ForCausalLM(cfg)
  else:
    cfg = transformers.LlamaConfig(**_LLAMA, **extra)
    model = transformers.LlamaForCausalLM(cfg)
  cfg._attn_implementation = "eager"
  with torch.no_grad():  # random norms and biases, so that they are really tested
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def convert(model):
  config = from_hf_config(model.config.to_dict())
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return config, params_from_hf(state.__getitem__, set(state), config)


def tokens(batch=2, seq=17, seed=0):
  return np.random.default_rng(seed).integers(0, 101, size=(batch, seq)).astype(np.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
  model = build_hf(case)
  config, params = convert(model)
  ids = tokens()
  with torch.no_grad():
    ref = model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
  ours = jitted.forward(params, ids, config=config)
  assert np.abs(np.asarray(ours) - ref.logits.numpy()).max() <= TOL
  # Per block: hidden_states[i] is the input of layer i (the last entry has the final norm applied).
  ctx = M.context(config, *ids.shape)
  for i in range(config.num_layers - 1):
    out = M.block(params["layers"][i], jnp.asarray(ref.hidden_states[i].numpy()), ctx, config=config)
    assert np.abs(np.asarray(out) - ref.hidden_states[i + 1].numpy()).max() <= TOL, f"block {i}"


@pytest.mark.parametrize("case", ["llama-gqa-tied", "opt-pre-ln"])
def test_batched_padded_equals_one_at_a_time(case):
  config, params = convert(build_hf(case))
  fwd = jax.jit(lambda p, t, m: M.forward(p, t, config=config, mask=m))
  a, b = tokens(1, 12, 1)[0], tokens(1, 7, 2)[0]
  batch = np.zeros((2, 12), np.int32)
  mask = np.zeros((2, 12), np.int32)
  batch[0], mask[0] = a, 1
  batch[1, 5:], mask[1, 5:] = b, 1  # left padding
  out = np.asarray(fwd(params, batch, mask))
  alone_a = np.asarray(fwd(params, a[None], np.ones((1, 12), np.int32)))[0]
  alone_b = np.asarray(fwd(params, b[None], np.ones((1, 7), np.int32)))[0]
  assert np.abs(out[0] - alone_a).max() <= TOL
  assert np.abs(out[1, 5:] - alone_b).max() <= TOL


def test_taps_are_the_inputs_of_the_linears():
  config, params = convert(build_hf("llama-gqa-tied"))
  ids = tokens()
  ctx = M.context(config, *ids.shape)
  h = M.embed(params, ids, config=config)
  out, taps = M.block(params["layers"][0], h, ctx, config=config, taps=True)
  assert set(taps) == set(M.linear_groups(config)) | {MID}
  lp = params["layers"][0]
  # The q projection of the tapped input, through the block, equals the block output: check via the o/down taps.
  attn = taps["o_in"] @ lp["self_attn"]["o_proj"]["kernel"]
  mlp = taps["down_in"] @ lp["mlp"]["down_proj"]["kernel"]
  np.testing.assert_allclose(np.asarray(h + attn + mlp), np.asarray(out), atol=TOL)
  np.testing.assert_allclose(np.asarray(h + attn), np.asarray(taps[MID]), atol=TOL)  # the residual entering the MLP
  assert taps["attn_in"].shape == (*ids.shape, config.hidden_size)
  assert taps["down_in"].shape == (*ids.shape, config.intermediate_size)


def test_tap_order_is_the_order_of_computation():
  config, _ = convert(build_hf("llama-gqa-tied"))
  assert M.tap_order(config) == ("attn_in", "o_in", MID, "mlp_in", "down_in")
  assert M.tap_order(config, ("skip", "full")) == (MID, "mlp_in", "down_in")
  assert M.tap_order(config, ("full", "bias")) == ("attn_in", "o_in", MID)


def test_state_dict_round_trip_is_exact():
  model = build_hf("opt-project-in-out")
  config, params = convert(model)
  back = params_to_hf(params, config)
  state = model.state_dict()
  assert config.tie_word_embeddings and set(state) - set(back) == {"lm_head.weight"}  # tied: not stored twice
  for name, value in back.items():
    np.testing.assert_array_equal(value, state[name].numpy(), err_msg=name)


def test_converter_refuses_unknown_config_attributes():
  cfg = transformers.LlamaConfig(**_LLAMA).to_dict()
  cfg["fancy_new_attention"] = True
  with pytest.raises(JaxpruneError, match="fancy_new_attention"):
    from_hf_config(cfg)
  cfg = transformers.LlamaConfig(**_LLAMA).to_dict()
  cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
  with pytest.raises(JaxpruneError, match="yarn"):
    from_hf_config(cfg)
  with pytest.raises(JaxpruneError, match="unsupported model type 'gpt2'"):
    from_hf_config({"model_type": "gpt2"})


def test_abstract_params_of_a_7b_shape_cost_no_memory():
  cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, vocab_size=32000).to_dict()
  shapes = M.abstract_params(from_hf_config(cfg))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert count == 6_738_415_616  # LLaMA-2-7B parameter count


def _attention_f64(q, k, v, mask):
  """Plain float64 softmax attention, KV heads repeated, for checking the chunked kernel."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(np.asarray(mask), scores, -1e300)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(q.shape[0], q.shape[1], -1)


@pytest.mark.parametrize("chunk", [1, 4, 7, 128])
def test_chunked_attention_equals_float64_softmax(chunk):
  from jaxprune.models._layers import attention_mask, dot_attention

  rng = np.random.default_rng(chunk)
  b, t, h, kv, d = 2, 19, 6, 2, 8
  q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d)))
  padding = np.ones((b, t), np.int32)
  padding[1, :5] = 0  # left padding: rows 0..4 of window 1 see no key at all
  mask = attention_mask(jnp.asarray(padding), b, t, window=6)
  got = np.asarray(jax.jit(lambda *a: dot_attention(*a, mask, chunk=chunk))(q, k, v))
  assert np.isfinite(got).all()  # padding rows included
  real = np.asarray(mask).any(-1)[:, 0]  # (b, t): query rows that see at least one key
  assert (~real).sum() == 5
  np.testing.assert_allclose(got[real], _attention_f64(q, k, v, mask)[real], atol=2e-6, rtol=1e-5)
