"""The model's forward for tests, jitted once per config: one compiled program per shape instead of one per
operation (eager execution compiles every operation on its own, which dominated the suite's time)."""
import functools

import jax
import jax.numpy as jnp

from jaxprune.models import _model as M


@functools.lru_cache(maxsize=None)
def _compiled(config):
  return jax.jit(lambda params, tokens: M.forward(params, tokens, config=config))


def forward(params, tokens, *, config) -> jax.Array:
  """``M.forward(params, tokens, config=config)``, compiled."""
  return _compiled(config)(params, jnp.asarray(tokens))
