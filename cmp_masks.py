import time, jax, jax.numpy as jnp, numpy as np
import old_masks as O
from jaxprune.prune import masks as N
rng = np.random.default_rng(1)
def timeit(f, *a, n=10):
  jax.block_until_ready(f(*a)); t = time.perf_counter()
  for _ in range(n): jax.block_until_ready(f(*a))
  return (time.perf_counter() - t) / n * 1e3
# exactness on random inputs, with and without ties, traced k
checks = 0
for trial in range(60):
  shape = tuple(rng.integers(1, 40, size=rng.integers(1, 4)))
  kind = trial % 3
  x = rng.standard_normal(shape)
  if kind == 1: x = np.round(x * 2) / 2  # many ties
  if kind == 2: x = np.where(rng.random(shape) < 0.3, 0.0, x); x[..., :1] = -0.0
  for dt in (np.float32, np.float64):
    xs = jnp.asarray(x.astype(dt)) if dt == np.float32 else None
    if xs is None:
      continue
    n = shape[-1]
    for k in sorted({0, n, int(rng.integers(0, n + 1))}):
      a = np.asarray(jax.jit(O.keep_mask)(xs, k)); b = np.asarray(jax.jit(N.keep_mask)(xs, k))
      assert (a == b).all(); checks += 1
    total = int(np.prod(shape))
    for k in sorted({0, total, int(rng.integers(0, total + 1))}):
      a = np.asarray(jax.jit(O.layer_mask)(xs, k)); b = np.asarray(jax.jit(N.layer_mask)(xs, k))
      assert (a == b).all(); checks += 1
print("exact checks", checks)
for shape in [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096)]:
  x = jnp.asarray(np.abs(rng.standard_normal(shape)).astype(np.float32))
  q = jnp.round(x * 8) / 8
  row = []
  for name, arr in (("cont", x), ("ties", q)):
    k = shape[1] // 2
    ko, kn = jax.jit(lambda s: O.keep_mask(s, k)), jax.jit(lambda s: N.keep_mask(s, k))
    lo, ln = jax.jit(lambda s: O.layer_mask(s, s.size // 2)), jax.jit(lambda s: N.layer_mask(s, s.size // 2))
    assert (np.asarray(ko(arr)) == np.asarray(kn(arr))).all() and (np.asarray(lo(arr)) == np.asarray(ln(arr))).all()
    nn = 3 if shape[0] > 2000 else 20
    row.append(f"{name}: keep {timeit(ko, arr, n=nn):.2f}->{timeit(kn, arr, n=nn):.2f} layer {timeit(lo, arr, n=nn):.2f}->{timeit(ln, arr, n=nn):.2f}")
  print(shape, " | ".join(row), flush=True)
