"""Process-wide settings made by ``import jaxprune``."""
import os
import subprocess
import sys

import numpy as np

_CHOLESKY_SOLVE = """
import sys
import numpy as np
{prelude}
import jax
import jax.numpy as jnp
x = np.random.default_rng(0).standard_normal((1024, 512)).astype(np.float32)
gram = jnp.asarray(x.T @ x)
inverse = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(gram), True), jnp.eye(512, dtype=jnp.float32))
np.save(sys.argv[1], np.asarray(inverse))
print(os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
"""


def _run(tmp_path, name: str, prelude: str, env: dict) -> tuple[str, np.ndarray]:
  out = tmp_path / f"{name}.npy"
  code = _CHOLESKY_SOLVE.format(prelude="import os\n" + prelude)
  proc = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, check=True)
  return proc.stdout.strip(), np.load(out)


def test_import_makes_openblas_threads_sleep_without_changing_lapack_results(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
  timeout, quick = _run(tmp_path, "quick", "import jaxprune", env)
  assert timeout == "4"
  kept, spinning = _run(tmp_path, "spinning", "import jaxprune", {**env, "OPENBLAS_THREAD_TIMEOUT": "28"})
  assert kept == "28"  # a value the user set stays
  np.testing.assert_array_equal(quick, spinning)
