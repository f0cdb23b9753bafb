"""The runner: every forward pass of jaxprune -- the pruning pass, perplexity, the depth metrics, retraining --
goes through one :class:`Runner`, which owns the mesh, the batching of windows and the jitted pieces."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxprune import _tree as tree
from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig
from jaxprune.models._layers import compute_dtype
from jaxprune.runner import _forward as F
from jaxprune.runner._batches import Batches


def windows_in_turn(mesh: Mesh | None) -> bool:
  """The default batching inside a block: window by window on a CPU without a multi-device mesh (the per-window
  intermediates stay in cache), the whole batch at once elsewhere (a loop over a sharded batch axis would gather
  it; accelerators want the large products)."""
  return jax.default_backend() == "cpu" and (mesh is None or mesh.size == 1)


class Runner:
  """Forward passes of models of one architecture over batches of windows split over ``mesh``'s ``data`` axis.

  Args:
    config: the model's config; blocks compile against its :func:`static_config`, so models that differ only in
      their structure edits (depth pruning) share compilations.
    mesh: a mesh (see :func:`make_mesh`) whose ``data`` axis splits batches, or ``None`` for the default
      device.
    batch_size: windows per batch, rounded up to a multiple of the ``data`` axis.
    windowed: inside a block, windows one at a time (default: :func:`windows_in_turn`).

  Every method takes parameters explicitly; blocks take their sublayer ``modes`` (``config.sublayer_modes(i)``).
  Activations ``h`` are ``(b, t, hidden)``, tokens ``(b, t)`` int32, per-window weights ``(b,)`` float32.
  """

  def __init__(self, config: ModelConfig, *, mesh: Mesh | None = None, batch_size: int = 8,
               windowed: bool | None = None):
    self.config = config
    self.static = F.static_config(config)
    self.mesh = mesh
    self.batch_size = batch_size
    self.windowed = windows_in_turn(self.mesh) if windowed is None else windowed

  @property
  def layer_modes(self) -> tuple[tuple[str, str], ...]:
    return tuple(self.config.sublayer_modes(i) for i in range(self.config.num_layers))

  def batches(self, n: int, seq: int) -> Batches:
    """The batching of ``n`` windows of ``seq`` positions."""
    return Batches(n, seq, batch_size=self.batch_size, mesh=self.mesh)

  def replicate(self, tree):
    """``tree`` on every device of the mesh, once."""
    return jax.device_put(tree, NamedSharding(self.mesh, P()) if self.mesh is not None else None)

  def place(self, params):
    """``params`` on the mesh: with a ``model`` axis, every matrix split along its first dimension that the axis
    divides (FSDP-style: each device holds about ``1/model`` of the parameters, and the compiled programs gather
    a matrix where it is used); vectors, and everything without a ``model`` axis, replicated."""
    if self.mesh is None:
      return jax.device_put(params)
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(self.mesh, param_spec(np.shape(x), self.mesh))),
                        params)

  def context(self, batch: int, seq: int):
    """The per-pass :class:`~jaxprune.models._layers.Context` of ``(batch, seq)`` windows, on the devices."""
    return _context(self.static, batch, seq, self.mesh)

  def embed(self, params, tokens):
    """Token ids ``(b, t)`` -> residual stream ``(b, t, hidden)``."""
    return F.embed(params, tokens, config=self.static)

  def block(self, block_params, h, *, modes=("full", "full"), given: dict | None = None):
    """One block: ``(b, t, hidden) -> (b, t, hidden)``; ``given`` replaces the tapped inputs it names."""
    return F.block(block_params, h, self.context(*h.shape[:2]), given, config=self.static, modes=modes,
                   windowed=self.windowed)

  def taps(self, block_params, h, *, names: tuple[str, ...], modes=("full", "full"), given: dict | None = None):
    """``{name: input of the linears of tap name}`` of one block for ``names`` (see ``models.linear_groups``;
    ``models.MID`` is the residual stream entering the MLP); only what feeds them is computed."""
    return F.taps(block_params, h, self.context(*h.shape[:2]), given, config=self.static, modes=modes,
                  names=tuple(names), windowed=self.windowed)

  def tap_sums(self, block_params, h, weights, sums: dict, *, names: tuple[str, ...], keep: tuple[str, ...] = (),
               modes=("full", "full"), given: dict | None = None):
    """``(sums, kept)``: ``sums[name]`` (float32 ``(width,)``, donated) plus the squared norms over tokens of the
    taps ``names``, each window weighted by ``weights`` ``(b,)``, and the taps ``keep`` as :meth:`taps` returns
    them: the statistics that need no Gram matrix (Wanda's) summed inside the block's program, window by window,
    so that a tap that is only summed is never written out."""
    return F.tap_sums(block_params, h, self.context(*h.shape[:2]), given, weights, sums, config=self.static,
                      modes=modes, names=tuple(names), keep=tuple(keep), windowed=self.windowed)

  def head_losses(self, params, h, tokens):
    """Mean next-token cross-entropy per window ``(b,)`` of the stream ``h`` leaving the last block."""
    return F.head_losses(params, h, tokens, config=self.static)

  def window_losses(self, params, tokens):
    """Mean next-token cross-entropy per window ``(b,)`` of the whole model, block by block (every block of a
    shape runs one compiled program)."""
    chex.assert_rank(tokens, 2)
    chex.assert_type(tokens, int)
    h = self.embed(params, tokens)
    for block_params, modes in zip(params["layers"], self.layer_modes):
      h = self.block(block_params, h, modes=modes)
    return self.head_losses(params, h, tokens)

  def loss_and_grad(self, params, tokens, weights, *, trainable=None, remat: bool = False):
    """``(loss, grads)`` of the weighted mean window loss on ``tokens`` ``(b, t)`` with window ``weights``.

    ``trainable``: a tree of bools shaped like ``params`` (``True`` = differentiated; default: all); ``grads``
    has ``None`` at the frozen leaves. ``remat`` recomputes block activations in the backward pass.
    """
    if trainable is None:
      trainable = jax.tree.map(lambda _: True, params)
    return self.value_and_grad(*F.split(params, trainable), tokens, weights, remat=remat)

  def value_and_grad(self, trainable, frozen, tokens, weights, *, assemble=None, remat: bool = False):
    """``(loss, grads)`` as :meth:`loss_and_grad`, for any split of what is trained: the model's parameters are
    ``assemble(trainable, frozen)`` (a hashable function, traced once; default: the union of the halves of
    :func:`~jaxprune.runner.split`), e.g. base weights plus adapters merged on the fly; ``grads`` has the
    structure of ``trainable``."""
    return F.loss_and_grad(trainable, frozen, tokens, weights, self.context(*tokens.shape), config=self.static,
                           layer_modes=self.layer_modes, windowed=self.windowed, remat=remat, assemble=assemble)

  def block_value_and_grad(self, trainable, frozen, h, target, weights, *, modes=("full", "full"), assemble=None):
    """``(loss, grads)`` of the mean squared error between one block's output on ``h`` ``(b, t, hidden)`` and
    ``target`` ``(b, t, hidden)``: the mean over positions and features, weighted over windows by ``weights``
    ``(b,)``. The block's parameters are ``assemble(trainable, frozen)`` (a hashable function; default: the union
    of the halves of :func:`~jaxprune.runner.split`); ``grads`` has the structure of ``trainable``."""
    return F.block_loss_and_grad(trainable, frozen, h, target, weights, self.context(*h.shape[:2]),
                                 config=self.static, modes=modes, windowed=self.windowed, assemble=assemble)

  def curvature(self, params, windows: np.ndarray, *, key: jax.Array, sampled: bool = True,
                progress: bool = False) -> list[dict]:
    """Kronecker factors of the Fisher of every linear over token ``windows`` ``(n, t)`` (LLM Surgeon, van der
    Ouderaa et al. 2024): per layer ``{"A": {tap: Σ a aᵀ}, "a": {tap: Σ a}, "G": {path: Σ g gᵀ}, "count": n·t}``
    (float32 sums over tokens; divide by ``count`` for expectations). ``a`` is a linear's input, ``g`` the
    gradient of the summed next-token loss at its output, with labels drawn from the model (``sampled``, the
    true Fisher) or the data's next tokens. One forward and one backward per batch, split over the mesh.
    """
    groups = tuple(tuple(M.present_linears(self.static, block).items()) for block in params["layers"])
    dtype = compute_dtype(jax.tree.leaves(params)[0].dtype)
    moments = []
    for block, layer_groups in zip(params["layers"], groups):
      width = {path: tree.get(block, path)["kernel"].shape for _, paths in layer_groups for path in paths}
      moments.append({
          "A": {tap: jnp.zeros((width[paths[0]][0],) * 2, dtype) for tap, paths in layer_groups},
          "a": {tap: jnp.zeros((width[paths[0]][0],), dtype) for tap, paths in layer_groups},
          "G": {path: jnp.zeros((width[path][1],) * 2, dtype) for _, paths in layer_groups for path in paths},
      })
    moments = self.replicate(moments)
    batches = self.batches(*windows.shape)
    params = self.place(params)
    for b, (tokens, weights, _) in enumerate(tqdm(batches.chunks(np.asarray(windows, np.int32)), total=len(batches),
                                                   desc="curvature", unit="batch", disable=not progress)):
      moments = F.curvature_step(moments, params, tokens, weights, jax.random.fold_in(key, b),
                                 self.context(*tokens.shape), config=self.static, layer_modes=self.layer_modes,
                                 groups=groups, windowed=self.windowed, sampled=sampled)
    count = float(windows.shape[0] * windows.shape[1])
    return [{**jax.device_get(layer), "count": count} for layer in moments]

  def map_windows(self, fn, x: np.ndarray, *, into: np.ndarray | None = None) -> np.ndarray:
    """``fn`` over batches of ``x`` ``(n, t, ...)``, gathered to host float32 ``(n, ...)``; into ``into`` if it
    has that shape (see :func:`~jaxprune.runner._batches.gathered`)."""
    return self.batches(*x.shape[:2]).map(fn, x, into=into)


def as_input(h, params):
  """Activations ``h`` (kept on the host in float32 between blocks) in the dtype ``params`` compute in, the
  narrowest float of their leaves: exact, since blocks of that dtype wrote them."""
  dtypes = [leaf.dtype for leaf in jax.tree.leaves(params)]
  return h.astype(min(dtypes, key=lambda d: d.itemsize)) if dtypes else h


def param_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
  """The sharding of a parameter of ``shape`` (see :meth:`Runner.place`)."""
  size = mesh.shape.get("model", 1)
  if size > 1 and len(shape) >= 2:
    for axis, n in enumerate(shape):
      if n % size == 0:
        return P(*(None,) * axis, "model")
  return P()


_full_context = jax.jit(M.context, static_argnums=(0, 1, 2))  # one program, not a compiled operation per step


@functools.lru_cache(maxsize=64)
def _context(config: ModelConfig, batch: int, seq: int, mesh: Mesh | None):
  ctx = _full_context(config, batch, seq)
  if mesh is None or "data" not in mesh.shape:
    return ctx
  return jax.device_put(ctx, NamedSharding(mesh, P("data")))
