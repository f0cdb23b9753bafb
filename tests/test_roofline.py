"""The FLOP count of ``experiments/prune_speed/roofline.py`` against a count by hand on a tiny LLaMA, and against
XLA's own count of one compiled block."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.prune_speed.roofline import attention_flops, gram_fraction, pass_flops  # noqa: E402
from jaxprune.models import ModelConfig, init_params  # noqa: E402
from jaxprune.runner import Runner, _forward as F  # noqa: E402

# hidden 8, MLP 12, 2 query heads and 1 KV head of 4: q 8x8, k and v 4x8, o 8x8, gate and up 12x8, down 8x12
TINY = ModelConfig(family="llama", vocab_size=31, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2,
                   num_kv_heads=1, head_dim=4, max_position_embeddings=16, tie_word_embeddings=True)
WINDOWS, SEQ, CHUNK = 3, 4, 2
TOKENS = WINDOWS * SEQ  # 12
# Per token: q 2·8·8 = 128, k 64, v 64, o 128, gate 192, up 192, down 192 (960; 768 without down).
# Attention per window, chunks of 2 queries against keys [0, 2) and [0, 4): 2·2 + 2·4 = 12 query-key pairs, each
# 2·4 for the score and 2·4 for the value, per query head: 12 · 16 · 2 = 384.
TAPS = 768 * TOKENS + 384 * WINDOWS  # 10368 per block
BLOCK = 960 * TOKENS + 384 * WINDOWS  # 12672
DOWN = 192 * TOKENS  # 2304
NORMS = 2 * TOKENS * (8 + 8 + 8 + 12)  # squared norms of the 4 distinct inputs: 864
GRAMS = 2 * TOKENS * (64 + 64 + 64 + 144)  # 8064
INVERSE = 2 / 3 * (3 * 8**3 + 12**3)  # one factor per distinct input
OBS = 2 * (8 * 64 + 4 * 64 + 4 * 64 + 8 * 64 + 12 * 64 + 12 * 64 + 8 * 144)  # 2·d_out·d_in² per linear: 9472


def _count(method, true_sequential, computed=False, blocksize=128):
  return pass_flops(TINY, windows=WINDOWS, seq=SEQ, method=method, true_sequential=true_sequential,
                    computed=computed, chunk=CHUNK, blocksize=blocksize)


@pytest.mark.parametrize("true_sequential", [False, True])
def test_wanda_count_by_hand(true_sequential):
  flops = _count("wanda", true_sequential)
  outputs = DOWN if true_sequential else BLOCK
  assert flops == {"taps": 2 * TAPS, "outputs": 2 * outputs, "statistics": 2 * NORMS, "solver": 0.0,
                   "total": 2 * (TAPS + outputs + NORMS)}


@pytest.mark.parametrize("true_sequential", [False, True])
def test_sparsegpt_count_by_hand(true_sequential):
  flops = _count("sparsegpt", true_sequential)
  outputs = DOWN if true_sequential else BLOCK
  assert flops["taps"] == 2 * TAPS and flops["outputs"] == 2 * outputs
  assert flops["statistics"] == 2 * (NORMS + GRAMS)
  assert flops["solver"] == pytest.approx(2 * (INVERSE + OBS))
  assert flops["total"] == pytest.approx(2 * (TAPS + outputs + NORMS + GRAMS + INVERSE + OBS))


def test_sparsegpt_computed_count_by_hand():
  """Blocks of 4 columns: the update on d_in padded to 8 or 12 (already multiples), ``2·d_out·pad·(pad + 4)``,
  the reports' dense output energy ``2·d_out·d_in²``, a factor ``4/3·d³`` per linear; full Grams at these widths."""
  flops = _count("sparsegpt", False, computed=True, blocksize=4)
  update = sum(2 * o * i * (i + 4) + 2 * o * i * i for o, i in [(8, 8), (4, 8), (4, 8), (8, 8), (12, 8), (12, 8),
                                                                     (8, 12)])
  inverse = 4 / 3 * (3 * 8**3 + 8**3 + 2 * 8**3 + 12**3)
  assert flops["solver"] == pytest.approx(2 * (update + inverse))
  assert flops["statistics"] == 2 * (NORMS + GRAMS)


def test_gram_fraction():
  assert gram_fraction(64) == 1.0 and gram_fraction(1536) == 10 / 16 and gram_fraction(256) == 3 / 4


def test_block_count_agrees_with_xla():
  """XLA's count of one compiled block (one window, no ``lax.map``) exceeds the products counted here only by the
  elementwise work (norms, rotary, softmax, SiLU): less than 5 % at these widths."""
  config = TINY.replace(hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=16)
  seq = 64
  runner = Runner(config, batch_size=1)
  block = init_params(config, jax.random.key(0))["layers"][0]
  h = jnp.zeros((1, seq, 64), jnp.float32)
  cost = F.block.lower(block, h, runner.context(1, seq), None, config=runner.static, modes=("full", "full"),
                       windowed=False).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  counted = pass_flops(config, windows=1, seq=seq, method="wanda", true_sequential=False)["outputs"]
  counted /= config.num_layers
  assert counted <= cost["flops"] < 1.05 * counted
  assert attention_flops(config, seq, chunk=seq) == 2 * 2 * 16 * seq * seq * 4
