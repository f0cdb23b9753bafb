"""Process-wide settings made by ``import jaxprune``."""
import os
import subprocess
import sys

import numpy as np

_CHOLESKY_SOLVE = """
import os
import sys
import numpy as np
import jaxprune
import jax
import jax.numpy as jnp
x = np.random.default_rng(0).standard_normal((1024, 512)).astype(np.float32)
gram = jnp.asarray(x.T @ x)
inverse = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(gram), True), jnp.eye(512, dtype=jnp.float32))
np.save(sys.argv[1], np.asarray(inverse))
print(os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
"""


def _run(tmp_path, name: str, env: dict) -> tuple[str, np.ndarray]:
  """Runs a Cholesky solve after ``import jaxprune`` in a fresh process; returns the timeout it saw and the result."""
  out = tmp_path / f"{name}.npy"
  proc = subprocess.run([sys.executable, "-c", _CHOLESKY_SOLVE, str(out)], env=env, capture_output=True, text=True,
                        check=True)
  return proc.stdout.strip(), np.load(out)


def test_import_makes_openblas_threads_sleep_without_changing_lapack_results(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
  timeout, quick = _run(tmp_path, "quick", env)
  assert timeout == "4"
  kept, spinning = _run(tmp_path, "spinning", {**env, "OPENBLAS_THREAD_TIMEOUT": "28"})
  assert kept == "28"  # a value the user set stays
  np.testing.assert_array_equal(quick, spinning)
