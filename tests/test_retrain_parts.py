"""Retraining building blocks (PERP subsets and adapters, masked fine-tuning) on tiny random LLaMA and OPT models."""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import jitted
import tolerances as tol

from jaxprune.errors import JaxpruneError

from jaxprune import models as M
from jaxprune.models import ModelConfig, from_hf_config, to_hf_config

R = importlib.import_module("jaxprune.retrain")  # the package: the attribute jaxprune.retrain is the function

H, I, V, P = 24, 40, 61, 32  # hidden, intermediate, vocab, max positions
LLAMA = ModelConfig(family="llama", vocab_size=V, hidden_size=H, intermediate_size=I, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=6, max_position_embeddings=P, tie_word_embeddings=False)
OPT = ModelConfig(family="opt", vocab_size=V, hidden_size=H, intermediate_size=I, num_layers=2, num_heads=4,
                  num_kv_heads=4, head_dim=6, max_position_embeddings=P, tie_word_embeddings=True, norm_eps=1e-5,
                  pre_norm=True, activation="relu", qkv_bias=True, o_bias=True, mlp_bias=True, norm_affine=True)
TOKENS = np.random.default_rng(0).integers(0, V, size=(2, 9)).astype(np.int32)


def _random_params(config, seed):
  """Random params of ``config``'s shapes, filled by NumPy (no per-op compilations, unlike ``init_params``):
  kernels N(0, 1/d_in), norm scales near 1, biases and embeddings small."""
  rng = np.random.default_rng(seed)

  def fill(path, like):
    name = str(getattr(path[-1], "key", path[-1]))
    x = rng.standard_normal(like.shape)
    x = {"kernel": x / np.sqrt(like.shape[0]), "scale": 1 + 0.1 * x}.get(name, 0.1 * x)
    return jnp.asarray(x, like.dtype)

  return jax.tree_util.tree_map_with_path(fill, M.abstract_params(config))


def _logits(params, config):
  """``forward`` of ``TOKENS``, jitted once per config."""
  return np.asarray(jitted.forward(params, TOKENS, config=config))


@pytest.fixture(scope="module")
def llama():
  """LLaMA params with zero biases added, and its config."""
  return R.with_biases(_random_params(LLAMA, 0), LLAMA)


@pytest.fixture(scope="module")
def opt():
  return _random_params(OPT, 1), OPT


def _prune(params, fraction=0.5):
  """Magnitude-prunes every block linear (exactly ``floor(fraction·size)`` per kernel, in NumPy); returns params,
  masks."""
  masks, layers = [], []
  for block in params["layers"]:
    block_masks = {}
    for path in R.linear_paths(block):
      linear = R._subsets.get_path(block, path)
      k = np.asarray(linear["kernel"])
      keep = np.ones(k.size, bool)
      keep[np.argsort(np.abs(k).ravel(), kind="stable")[:int(fraction * k.size)]] = False
      keep = keep.reshape(k.shape)
      block = R._subsets.set_path(block, path, {**linear, "kernel": jnp.asarray(np.where(keep, k, 0))})
      block_masks[path] = jnp.asarray(keep)
    masks.append(block_masks)
    layers.append(block)
  return {**params, "layers": layers}, masks


def _randomize(adapters, seed=0):
  """Adapters moved away from their init, so that they change the model."""
  leaves, treedef = jax.tree.flatten(adapters)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [x + 0.3 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves])


def _one_line(excinfo):
  assert "\n" not in str(excinfo.value) and str(excinfo.value)


# ---------------------------------------------------------------------------------------------------- specs, counts

def test_spec_is_canonical_and_hashable():
  a = R.parse_train_spec(" masklora:16 ,norms, biases")
  b = R.parse_train_spec("biases,norms,masklora:16")
  assert a == b and hash(a) == hash(b) and str(a) == "biases,norms,masklora:16"
  assert (a.adapter, a.rank, a.scale, a.subsets) == ("masklora", 16, 2.0, ("biases", "norms"))
  assert R.parse_train_spec("all").full and R.parse_train_spec("scalelora").rank == R.DEFAULT_RANK
  assert R.parse_train_spec("lora:8", alpha=8.0).scale == 1.0
  assert R.TrainSpec(("norms", "biases", "norms"), "masklora", 16) == a  # constructed directly: canonical too


@pytest.mark.parametrize("text", ["", "weights", "lora:0", "masklora:-2", "lora:x", "lora:16,masklora:16",
                                  "lora:4,lora:8", "all,biases", "biases:3"])
def test_bad_spec_raises_one_line(text):
  with pytest.raises(JaxpruneError) as e:
    R.parse_train_spec(text)
  _one_line(e)


def _llama_counts():
  q, kv, o, mlp = H * H, H * 12, H * H, H * I  # kernels; 2 kv heads of 6
  biases = H + 12 + 12 + H + I + I + H
  norms = 2 * H
  block = q + 2 * kv + o + 3 * mlp + biases + norms
  total = V * H + (V * H + H) + 2 * block
  return {"biases": 2 * biases, "norms": 2 * norms + H, "head": V * H, "embeddings": V * H, "all": total,
          "biases,norms": 2 * (biases + norms) + H}, total


def _opt_counts():
  linear_biases, ln = 4 * H + I + H, 2 * 2 * H  # per block; two LayerNorms of scale and bias
  block = 4 * H * H + 2 * H * I + linear_biases + ln
  embed = V * H + (P + 2) * H
  total = embed + 2 * H + 2 * block  # head: final LayerNorm, LM head tied
  return {"biases": 2 * (linear_biases + 2 * H) + H, "norms": 2 * ln + 2 * H, "head": V * H, "embeddings": embed,
          "all": total, "biases,norms": 2 * (linear_biases + ln) + 2 * H}, total


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_trainable_counts_equal_hand_counts(family, llama, opt):
  params, config = llama if family == "llama" else opt
  expected, total = _llama_counts() if family == "llama" else _opt_counts()
  for text, n in expected.items():
    mask = R.trainable_mask(params, R.parse_train_spec(text))
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert R.count(params, mask) == (n, total, n / total), text
  # Adapters: r·(d_in + d_out) per linear; the kernels they adapt stay frozen.
  spec = R.parse_train_spec("norms,masklora:4")
  adapters = R.lora_init(params, spec, key=jax.random.key(0))
  per_block = (4 * (2 * 2 * H + 2 * (H + 12) + 3 * (H + I)) if family == "llama" else 4 * (4 * 2 * H + 2 * (H + I)))
  n = expected["norms"] + 2 * per_block
  assert R.count(params, R.trainable_mask(params, spec), adapters=adapters) == (n, total + 2 * per_block,
                                                                                n / (total + 2 * per_block))
  abstract = jax.eval_shape(lambda: params)  # counts need no memory
  assert R.count(abstract, R.trainable_mask(abstract, spec))[0] == expected["norms"]


def test_biases_on_llama_without_biases_is_refused():
  with pytest.raises(JaxpruneError, match="with_biases") as e:
    R.trainable_mask(_random_params(LLAMA, 0), R.parse_train_spec("biases,norms"))
  _one_line(e)


def test_with_biases_keeps_the_model_and_exports_attention_and_mlp_bias():
  plain = _random_params(LLAMA, 0)
  params, config = R.with_biases(plain, LLAMA)
  assert (config.qkv_bias, config.o_bias, config.mlp_bias) == (True, True, True)
  like = M.abstract_params(config)
  assert jax.tree.structure(params) == jax.tree.structure(like)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(like)))
  assert params["embed"] is plain["embed"] and params["head"] is plain["head"]
  tol.assert_reordered(_logits(params, config), _logits(plain, LLAMA), "logits with zero biases")
  for path in ("self_attn/o_proj", "mlp/down_proj"):  # and the model adds them
    linear = R._subsets.get_path(params["layers"][1], path)
    moved = {**params, "layers": [params["layers"][0], R._subsets.set_path(
        params["layers"][1], path, {**linear, "bias": linear["bias"] + 0.5})]}
    assert np.abs(_logits(moved, config) - _logits(params, config)).max() > 1e-3, path
  hf = to_hf_config(config)
  assert hf["attention_bias"] is True and hf["mlp_bias"] is True
  back = from_hf_config(hf)
  assert (back.qkv_bias, back.o_bias, back.mlp_bias) == (True, True, True)
  assert R.with_biases(params, config) == (params, config)  # already there: unchanged


def test_with_biases_export_is_what_transformers_builds(llama):
  """``attention_bias`` in transformers puts biases on q, k, v and o_proj; ``mlp_bias`` on gate, up, down."""
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  params, config = llama
  hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(config)))
  theirs = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
  ours = {k: v.shape for k, v in M.params_to_hf(params, config).items()}
  assert ours == theirs and "model.layers.1.self_attn.o_proj.bias" in ours and "model.layers.0.mlp.up_proj.bias" in ours


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_with_biases_refuses_what_export_cannot_express(model_type):
  config = LLAMA.replace(hf_config_json=f'{{"model_type": "{model_type}"}}')
  with pytest.raises(JaxpruneError, match=model_type) as e:
    R.with_biases(_random_params(LLAMA, 0), config)
  _one_line(e)
  with pytest.raises(JaxpruneError):
    R.with_biases(_random_params(OPT.replace(mlp_bias=False), 0), OPT.replace(mlp_bias=False))


# ---------------------------------------------------------------------------------------------------------- adapters

@pytest.mark.parametrize("kind", R.ADAPTER_KINDS)
def test_init_leaves_the_model_unchanged(kind, llama):
  params, _ = llama
  spec = R.parse_train_spec(f"{kind}:4")
  adapters = R.lora_init(params, spec, key=jax.random.key(3))
  block = params["layers"][0]
  assert set(adapters["layers"][0]) == set(R.linear_paths(block)) and len(R.linear_paths(block)) == 7
  for path, ad in adapters["layers"][0].items():
    d_in, d_out = R._subsets.get_path(block, path)["kernel"].shape
    assert ad["lora_a"].shape == (d_in, 4) and ad["lora_b"].shape == (4, d_out)
    if kind == "scalelora":
      tol.assert_within(ad["lora_a"] @ ad["lora_b"], np.ones((d_in, d_out)), tol.LOSS_F32, "BA at init")
    else:
      assert not np.any(ad["lora_b"]) and np.abs(ad["lora_a"]).max() <= 1 / np.sqrt(d_in)
      assert np.std(ad["lora_a"]) > 0.3 / np.sqrt(d_in)  # really random
  for a, b in zip(jax.tree.leaves(R.apply(params, adapters, None, spec)), jax.tree.leaves(params)):
    tol.assert_reordered(a, b, "adapted weights at init")


def _reference(kernel, adapter, mask, kind, scale):
  """Effective kernel from the formulas in the Hugging Face layout (W (d_out, d_in), B (d_out, r), A (r, d_in)),
  float64."""
  w = np.asarray(kernel, np.float64).T
  b, a = np.asarray(adapter["lora_b"], np.float64).T, np.asarray(adapter["lora_a"], np.float64).T
  m = np.asarray(mask).T
  eff = w * (b @ a) if kind == "scalelora" else w + scale * ((b @ a) * m if kind == "masklora" else b @ a)
  return eff.T


@pytest.mark.parametrize("kind", ["masklora", "scalelora"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_merge_keeps_zeros_and_equals_the_effective_weights(kind, family, llama, opt):
  params, config = llama if family == "llama" else opt
  params, masks = _prune(params)
  spec = R.parse_train_spec(f"{kind}:4")
  adapters = _randomize(R.lora_init(params, spec, key=jax.random.key(5)))
  merged = R.merge(params, adapters, masks, spec)
  reference = params
  for i, block in enumerate(params["layers"]):
    for path, ad in adapters["layers"][i].items():
      kernel, mask = R._subsets.get_path(block, path)["kernel"], np.asarray(masks[i][path])
      got = np.asarray(R._subsets.get_path(merged["layers"][i], path)["kernel"])
      assert np.all(got[~mask] == 0) and np.all(got[mask] != 0), path
      want = _reference(kernel, ad, mask, kind, spec.scale)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
      layers = list(reference["layers"])
      layers[i] = R._subsets.set_path(layers[i], path, {**R._subsets.get_path(layers[i], path),
                                                        "kernel": jnp.asarray(want, jnp.float32)})
      reference = {**reference, "layers": layers}
  # Masks measured from the zeros of the pruned kernels give the same merge.
  for a, b in zip(jax.tree.leaves(R.merge(params, adapters, None, spec)), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(a, b)
  want = _logits(reference, config)
  scale = np.abs(want).max()
  for candidate in (merged, R.apply(params, adapters, masks, spec)):
    assert np.abs(_logits(candidate, config) - want).max() <= 1e-5 * scale
  assert np.abs(_logits(params, config) - want).max() > 1e-2 * scale  # the adapters matter


def test_lora_merge_into_sparse_model_is_refused(llama):
  dense, _ = llama
  params, masks = _prune(dense)
  spec = R.parse_train_spec("lora:4")
  adapters = _randomize(R.lora_init(params, spec, key=jax.random.key(2)))
  for m in (masks, None):
    with pytest.raises(JaxpruneError, match="allow_densify") as e:
      R.merge(params, adapters, m, spec)
    _one_line(e)
  with pytest.raises(JaxpruneError, match="jit"):
    jax.jit(lambda p, a: R.merge(p, a, None, spec))(params, adapters)
  densified = R.merge(params, adapters, masks, spec, allow_densify=True)
  kernel = densified["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert np.mean(np.asarray(kernel) == 0) < 0.01
  dense_adapters = _randomize(R.lora_init(dense, spec, key=jax.random.key(2)))
  R.merge(dense, dense_adapters, None, spec)  # a dense model merges without the flag


@pytest.mark.parametrize("kind", R.ADAPTER_KINDS)
def test_jit_equals_eager_and_differentiable(kind, opt):
  params, masks = _prune(opt[0])
  spec = R.parse_train_spec(f"{kind}:4")
  adapters = _randomize(R.lora_init(params, spec, key=jax.random.key(7)))
  for fn in (R.apply, lambda *a: R.merge(*a, allow_densify=True)):
    eager = fn(params, adapters, masks, spec)
    jitted = jax.jit(fn, static_argnums=3)(params, adapters, masks, spec)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
      tol.assert_reordered(a, b, "jit against eager")
  def loss(ad):  # differentiable with respect to the adapters, through the mask
    eff = R.apply(params, ad, masks, spec)["layers"]
    return sum(jnp.sum(jnp.sin(R._subsets.get_path(b, p)["kernel"])) for b in eff for p in R.linear_paths(b))

  grads = jax.jit(jax.grad(loss))(adapters)
  assert all(np.all(np.isfinite(g)) and np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def test_adapters_and_masks_must_match_the_model(llama):
  params, _ = llama
  spec = R.parse_train_spec("masklora:4")
  adapters = R.lora_init(params, spec, key=jax.random.key(0))
  _, masks = _prune(params)
  bad_shape = [dict(m) for m in masks]
  bad_shape[1]["mlp/down_proj"] = masks[1]["mlp/down_proj"].T
  for call in (lambda: R.apply(params, adapters, masks[:1], spec),
               lambda: R.apply(params, {"layers": adapters["layers"][:1]}, None, spec),
               lambda: R.apply(params, adapters, bad_shape, spec),
               lambda: R.apply(params, adapters, [{}, {}], spec),
               lambda: R.project_masked(params, bad_shape),
               lambda: R.project_masked(params, masks[:1])):
    with pytest.raises(JaxpruneError) as e:
      call()
    _one_line(e)


# --------------------------------------------------------------------------------------------------------- optimizer

def test_schedule_is_hugging_face_linear_with_warmup():
  s = R.lr_schedule(1e-3, steps=20, warmup=0.1)  # ceil(2.0) = 2 warm-up steps
  got = [float(s(t)) for t in (0, 1, 2, 11, 19, 20, 25)]
  np.testing.assert_allclose(got, [0.0, 5e-4, 1e-3, 1e-3 * 9 / 18, 1e-3 / 18, 0.0, 0.0], rtol=1e-6)
  assert float(R.lr_schedule(1e-3, steps=10, warmup=0.0)(0)) == pytest.approx(1e-3)


@pytest.mark.parametrize("kwargs", [dict(lr=0.0), dict(lr=-1e-4), dict(steps=0), dict(accumulate=0),
                                    dict(warmup=1.0), dict(weight_decay=-0.1), dict(clip=-1.0)])
def test_bad_optimizer_options_raise_one_line(kwargs):
  with pytest.raises(JaxpruneError) as e:
    R.make_optimizer(R.parse_train_spec("norms"), **{"steps": 10, **kwargs})
  _one_line(e)


def _floats(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))


def test_frozen_parameters_carry_no_optimizer_state(opt):
  params, _ = opt
  assert jax.tree.leaves(optax.set_to_zero().init(params)) == []
  spec = R.parse_train_spec("biases,norms")
  n, total, _ = R.count(params, R.trainable_mask(params, spec))
  small = R.make_optimizer(spec, steps=10, weight_decay=0.01).init(params)
  full = R.make_optimizer(R.parse_train_spec("all"), steps=10, weight_decay=0.01).init(params)
  assert _floats(small) == 2 * n and _floats(full) == 2 * total and 2 * n < 0.05 * _floats(full)
  accumulating = R.make_optimizer(spec, steps=10, accumulate=4).init(params)
  assert _floats(accumulating) == 3 * n  # + the accumulated gradient, still of trainable leaves only
  # {"params", "adapters"}: params labelled by the spec, adapters all trainable.
  spec = R.parse_train_spec("norms,scalelora:2")
  adapters = R.lora_init(params, spec, key=jax.random.key(0))
  n, _, _ = R.count(params, R.trainable_mask(params, spec), adapters=adapters)
  assert _floats(R.make_optimizer(spec, steps=10).init({"params": params, "adapters": adapters})) == 2 * n
  n_adapters = sum(x.size for x in jax.tree.leaves(adapters))
  assert _floats(R.make_optimizer(R.parse_train_spec("scalelora:2"), steps=10).init(adapters)) == 2 * n_adapters


def _quadratic(trainable, frozen, batch):
  params = R.combine(trainable["params"], frozen["params"]) if "params" in frozen else trainable["params"]
  return sum(jnp.mean((p - t) ** 2) for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(frozen["target"])))


def _target(params, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)


def _run(trainable, frozen, optimizer, steps, project=None):
  step = jax.jit(R.train_step(jax.value_and_grad(_quadratic), optimizer, project=project))
  state = R.init_state(trainable, optimizer)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, frozen, None)
    losses.append(float(metrics["loss"]))
  assert step._cache_size() == 1 and int(state.step) == steps  # compiled once
  return state, losses


def test_masked_full_fine_tuning_keeps_pruned_weights_exactly_zero():
  config = LLAMA.replace(num_layers=1)  # optimizer tests compile per leaf: one block is enough
  params, masks = _prune(R.with_biases(_random_params(config, 3), config)[0])
  optimizer = R.make_optimizer(R.parse_train_spec("all"), lr=1e-2, steps=50, weight_decay=0.1)
  project = lambda t, f: {**t, "params": R.project_masked(t["params"], f["masks"])}  # noqa: E731
  state, losses = _run({"params": params}, {"masks": masks, "target": _target(params)}, optimizer, 50, project)
  assert losses[-1] < 0.9 * losses[0]
  for path, mask in masks[0].items():
    mask = np.asarray(mask)
    new = np.asarray(R._subsets.get_path(state.trainable["params"]["layers"][0], path)["kernel"])
    old = np.asarray(R._subsets.get_path(params["layers"][0], path)["kernel"])
    assert np.all(new[~mask] == 0.0) and np.all(new[mask] != old[mask]), path
  # Without the projection AdamW moves the pruned weights: the check above can fail.
  kernel = params["layers"][0]["mlp"]["down_proj"]["kernel"]
  small = {"params": {"layers": [{"mlp": {"down_proj": {"kernel": kernel}}}]}}
  state, _ = _run(small, {"target": _target(small["params"])}, R.make_optimizer(None, lr=1e-2, steps=5, clip=None), 5)
  loose = np.asarray(state.trainable["params"]["layers"][0]["mlp"]["down_proj"]["kernel"])
  assert np.all(loose[~np.asarray(masks[0]["mlp/down_proj"])] != 0.0)


def test_selective_training_leaves_frozen_arrays_untouched():
  config = OPT.replace(num_layers=1)
  params = _random_params(config, 4)
  spec = R.parse_train_spec("biases,norms")
  mask = R.trainable_mask(params, spec)
  trainable, frozen_params = R.partition(params, mask)
  target = _target(params, 1)
  optimizer = R.make_optimizer(spec, lr=1e-2, steps=20)
  state, losses = _run({"params": trainable}, {"params": frozen_params, "target": target}, optimizer, 20)
  assert losses[-1] < losses[0]
  after = R.combine(state.trainable["params"], frozen_params)
  flags, old, new = (jax.tree.leaves(t) for t in (mask, params, after))
  assert all((b is a) for m, a, b in zip(flags, old, new) if not m)  # the same arrays, never recomputed
  assert all(not np.array_equal(a, b) for m, a, b in zip(flags, old, new) if m)
  # Unpartitioned, the whole tree goes through the optimizer and the frozen leaves get exactly zero updates.
  toy = {"params": {"layers": [{"fc1": {"bias": jnp.ones(3, jnp.float32), "kernel": jnp.ones((2, 3), jnp.float32)}}]}}
  state, _ = _run(toy, {"target": _target(toy["params"])}, R.make_optimizer(spec, lr=1e-2, steps=3), 3)
  fc1 = state.trainable["params"]["layers"][0]["fc1"]
  np.testing.assert_array_equal(fc1["kernel"], toy["params"]["layers"][0]["fc1"]["kernel"])
  assert not np.array_equal(fc1["bias"], toy["params"]["layers"][0]["fc1"]["bias"])


def test_accumulation_updates_every_k_calls():
  x = {"params": {"w": jnp.ones((3, 2), jnp.float32)}}
  optimizer = R.make_optimizer(None, lr=1e-2, steps=4, warmup=0.0, accumulate=2)
  step = jax.jit(R.train_step(jax.value_and_grad(_quadratic), optimizer))
  frozen = {"target": {"w": jnp.zeros((3, 2), jnp.float32)}}
  state = R.init_state(x, optimizer)
  state, _ = step(state, frozen, None)
  np.testing.assert_array_equal(state.trainable["params"]["w"], x["params"]["w"])
  state, _ = step(state, frozen, None)
  assert np.all(np.asarray(state.trainable["params"]["w"]) < 1.0)
