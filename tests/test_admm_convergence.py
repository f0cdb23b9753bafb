"""The floor of ``experiments/admm_convergence``: its restricted least-squares optimum against ``numpy.linalg.lstsq``
on the explicit inputs, and the fixed point of :func:`jaxprune.prune.admm_update` against its damped variant."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.admm_convergence.run import masked_optimum  # noqa: E402
from jaxprune.prune import Stats, admm_update  # noqa: E402


def _problem(seed: int, *, dead: int | None = None):
  """``w`` ``(5, 11)``, inputs ``x`` ``(40, 11)`` (column ``dead`` zero), a keep mask with an empty row."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((40, 11)) @ (np.eye(11) + 0.3 * rng.standard_normal((11, 11)))
  if dead is not None:
    x[:, dead] = 0.0
  w = rng.standard_normal((5, 11))
  mask = rng.random((5, 11)) > 0.5
  mask[2] = False
  return w, x, mask


def _lstsq_rows(w, x, mask, damp=0.0):
  """Row by row: ``argmin ‖X w_i − X_k v‖² + damp·Σ_j G_jj (w_ij − ŵ_ij)²`` over ``v`` on the kept ``k``, as one
  least-squares problem on ``X`` stacked over ``sqrt(damp·diag G)`` (minimum-norm where rank-deficient)."""
  a = np.vstack([x, np.diag(np.sqrt(damp * np.sum(x * x, axis=0)))])
  out = np.zeros_like(w)
  for i, keep in enumerate(mask):
    if keep.any():
      out[i, keep] = np.linalg.lstsq(a[:, keep], a @ w[i], rcond=None)[0]
  return out


def test_masked_optimum_is_the_restricted_least_squares_solution():
  for damp, dead in ((0.0, None), (0.1, None), (0.0, 4)):
    w, x, mask = _problem(1, dead=dead)
    got = masked_optimum(w, x.T @ x, mask, damp=damp)
    np.testing.assert_allclose(got, _lstsq_rows(w, x, mask, damp), rtol=1e-8, atol=1e-10)
    assert not got[~mask].any()


def test_admm_update_converges_to_the_damped_optimum():
  """With ``percdamp`` the ADMM weight update solves the ridge problem on ``G + percdamp·diag(G)``: after many
  iterations it reaches that problem's optimum, not the undamped one (whose error it then exceeds)."""
  w, x, mask = _problem(2)
  gram = x.T @ x
  with jax.enable_x64(True):
    stats = Stats(gram=jnp.asarray(gram), sq_norms=jnp.asarray(np.diag(gram)), count=jnp.float64(40))
    got = np.asarray(admm_update(jnp.asarray(w), stats, mask=jnp.asarray(mask), percdamp=0.1, iterations=400).w)
  damped, exact = masked_optimum(w, gram, mask, damp=0.1), masked_optimum(w, gram, mask)
  np.testing.assert_allclose(got, damped, rtol=1e-6, atol=1e-8)
  error = lambda v: np.sum((w - v) * ((w - v) @ gram))  # noqa: E731
  assert error(exact) < error(damped)
