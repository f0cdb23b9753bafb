"""The perplexity loop: the protocol's formula, batching, and 1 device versus 8."""
import jax
import numpy as np
import pytest
import jitted
import tolerances as tol

from jaxprune.errors import JaxpruneError
from jaxprune._evaluate import data_mesh, perplexity
from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig

CONFIG = ModelConfig(family="llama", vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=3,
                     num_kv_heads=1, head_dim=8, max_position_embeddings=32, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def setup():
  params = M.init_params(CONFIG, jax.random.key(1))
  windows = np.random.default_rng(0).integers(0, 61, size=(11, 16)).astype(np.int32)
  return params, windows


def test_formula_is_exp_of_mean_window_loss(setup):
  params, windows = setup
  logits = np.asarray(jitted.forward(params, windows, config=CONFIG), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits - top).sum(-1, keepdims=True)) - top
  nll = -np.take_along_axis(logp[:, :-1], windows[:, 1:, None], axis=-1)[..., 0]
  expected = np.exp(nll.mean(axis=1).mean())
  result = perplexity(params, windows, config=CONFIG, batch_size=4, progress=False)
  assert result.perplexity == pytest.approx(expected, rel=tol.LOSS_F32)
  assert result.windows == 11 and result.tokens == 11 * 16 and result.window_losses.shape == (11,)


def test_same_perplexity_on_one_and_eight_devices(setup):
  params, windows = setup
  one = perplexity(params, windows, config=CONFIG, batch_size=8, mesh=data_mesh(jax.devices()[:1]), progress=False)
  eight = perplexity(params, windows, config=CONFIG, batch_size=8, mesh=data_mesh(), progress=False)
  assert jax.device_count() == 8
  tol.assert_reordered(eight.window_losses, one.window_losses, "window losses")
  tol.assert_reordered(np.log(eight.perplexity), np.log(one.perplexity), "log perplexity")


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 64), np.int32), "exceeds the model's 32 positions"),
    (np.full((2, 8), 61, np.int32), "token ids must lie in"),
    (np.zeros((0, 8), np.int32), "non-empty"),
    (np.zeros((2, 8), np.float32), "must hold integer token ids, got dtype float32"),
])
def test_bad_windows(setup, bad, message):
  with pytest.raises(JaxpruneError, match=message):
    perplexity(setup[0], bad, config=CONFIG, progress=False)
