"""Two processes on this machine (4 simulated CPU devices each, a coordinator on a free localhost port) prune as one:
the same masks, weights and perplexity as a single process, whole on every process, the checkpoint written once
(also streamed, each block written behind by process 0 into a directory both see);
a coordinator that cannot be reached is a one-line error within the timeout."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxprune import _tree as tree
from jaxprune._evaluate import perplexity
from jaxprune.cli import main
from jaxprune.errors import JaxpruneError
from jaxprune.io._checkpoint import BLOCKED_FORMAT, read_checkpoint, read_meta, save_checkpoint
from jaxprune.io._stream import Blocks
from jaxprune.models import _model as M
from jaxprune.models._config import ModelConfig
from jaxprune.prune import Unstructured
from jaxprune.prune import _job as job, _sequential as S
from jaxprune.runner import data_mesh
from jaxprune.runner._distributed import initialize
import tolerances as tol

# Every linear 32 x 32: one compilation of each solver serves all (the processes compile on two shared cores).
CONFIG = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=32, num_layers=2, num_heads=4,
                     num_kv_heads=4, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)
WANDA = S.PruneSpec("wanda", Unstructured(0.5))
SPARSEGPT = S.PruneSpec("sparsegpt", Unstructured(0.5))

# Run by each process in its own directory: Wanda through the command line (which joins the run), then SparseGPT
# through the library in the joined run, its result saved by every process.
_PROCESS = """
import sys
import jax
import numpy as np
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
from jaxprune.cli import main
from jaxprune.io._checkpoint import read_checkpoint
from jaxprune.prune import Unstructured, _sequential as S
from jaxprune.runner import data_mesh
from jaxprune.runner._distributed import initialize

model, blocked, shared, calib, evals, address, pid = sys.argv[1:]
run = ["--coordinator", address, "--num-processes", "2", "--process-id", pid, "--coordinator-timeout", "120"]
data = ["--calib", calib, "--nsamples", "16", "--seqlen", "16", "--batch-size", "8", "--eval", evals]
code = main(["prune", "--model", model, "--method", "wanda", *data, "--out", "wanda", "--json", "wanda.json", *run])
if code:
  sys.exit(code)
# Streamed, into a directory both processes see (as on a shared file system): blocks written behind by process 0
code = main(["prune", "--model", blocked, "--stream", "--method", "wanda", *data, "--out", shared, *run])
if code:
  sys.exit(code)
assert initialize(address, num_processes=2, process_id=int(pid))  # joined already: nothing more to do
config, params, _, _ = read_checkpoint(model)
spec = S.PruneSpec("sparsegpt", Unstructured(0.5))
state = S.run_pass(params, config, spec, np.load(calib), batch_size=8, mesh=data_mesh(), progress=False)
out = {f"{i}/{path}/mask": mask for i, masks in enumerate(state.masks) for path, mask in masks.items()}
out.update({f"{i}/{path}/kernel": S.kernel_at(state.params["layers"][i], path)
            for i, masks in enumerate(state.masks) for path in masks})
np.savez("sparsegpt.npz", devices=np.asarray([jax.process_count(), data_mesh().size, jax.local_device_count()]),
         **out)
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny random LLaMA checkpoint, 16 calibration and 8 evaluation windows of 16 tokens."""
  root = tmp_path_factory.mktemp("multihost")
  params = jax.tree.map(np.asarray, M.init_params(CONFIG, jax.random.key(0)))
  save_checkpoint(root / "tiny", CONFIG, params)
  save_checkpoint(root / "blocked", CONFIG, {**params, "layers": Blocks(params["layers"])})  # one file per block
  np.save(root / "calib.npy", np.random.default_rng(0).integers(0, 97, size=(16, 16)).astype(np.int32))
  np.save(root / "eval.npy", np.random.default_rng(1).integers(0, 97, size=(8, 16)).astype(np.int32))
  return root


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _by_block(masks: dict) -> list[dict]:
  """A checkpoint's mask tree as per-block ``{path: mask}``."""
  return [{path[:-len("/kernel")]: np.asarray(m) for path, m in tree.flatten(block).items()}
          for block in masks["layers"]]


def _saved_pass(path) -> tuple[list[dict], list[dict], list[int]]:
  """``(masks, kernels, [processes, devices of the mesh, local devices])`` of a process's ``sparsegpt.npz``, per
  block ``{path: array}``."""
  with np.load(path) as z:
    masks, kernels = [{} for _ in range(CONFIG.num_layers)], [{} for _ in range(CONFIG.num_layers)]
    for key in z.files:
      if key != "devices":
        i, *path, kind = key.split("/")
        (masks if kind == "mask" else kernels)[int(i)]["/".join(path)] = z[key]
    return masks, kernels, z["devices"].tolist()


def test_two_processes_prune_as_one_process(files, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",  # 4 devices each; quick compilation, as in conftest.py
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"}
  address = f"localhost:{_free_port()}"
  args = [str(files / "tiny"), str(files / "blocked"), str(tmp_path / "streamed"), str(files / "calib.npy"),
          str(files / "eval.npy"), address]
  dirs = [tmp_path / "p0", tmp_path / "p1"]
  procs = []
  for pid, cwd in enumerate(dirs):
    cwd.mkdir()
    procs.append(subprocess.Popen([sys.executable, "-c", _PROCESS, *args, str(pid)], cwd=cwd, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  # The single-process run, on this process's 8 devices, while the two others work.
  params = jax.tree.map(np.asarray, M.init_params(CONFIG, jax.random.key(0)))
  calib, evals = np.load(files / "calib.npy"), np.load(files / "eval.npy")
  wanda = job.prune(params, calib, config=CONFIG, spec=WANDA, batch_size=8, mesh=data_mesh(), progress=False)
  ppl = perplexity(wanda.params, evals, config=CONFIG, batch_size=8, mesh=data_mesh(), progress=False).perplexity
  sparsegpt = S.run_pass(params, CONFIG, SPARSEGPT, calib, batch_size=8, mesh=data_mesh(), progress=False)
  outputs = []
  for proc in procs:
    try:
      outputs.append(proc.communicate(timeout=300))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]

  # Wanda through the command line: one checkpoint and one JSON document, by process 0, nothing left behind.
  p0, p1 = dirs
  assert sorted(f.name for f in p1.iterdir()) == ["sparsegpt.npz"]
  assert (p0 / "wanda.json").is_file() and not (p0 / "wanda.partial").exists()
  config, got_params, got_masks, meta = read_checkpoint(p0 / "wanda", with_masks=True)
  assert config == CONFIG and meta["method"] == "wanda"
  tol.assert_passes_agree(_by_block(wanda.masks), wanda.params["layers"], _by_block(got_masks),
                          got_params["layers"], S.kernel_at)
  doc = json.loads((p0 / "wanda.json").read_text())
  tol.assert_reordered(doc["perplexity"], ppl, "perplexity")
  # Streamed (each block written behind by process 0, read back by both): the same run, the same bits.
  _, streamed_params, streamed_masks, _ = read_checkpoint(tmp_path / "streamed", with_masks=True)
  assert not (tmp_path / "streamed.partial").exists()
  assert read_meta(tmp_path / "streamed")["format"] == BLOCKED_FORMAT
  assert jax.tree.all(jax.tree.map(np.array_equal, (streamed_params, streamed_masks), (got_params, got_masks)))
  assert "multi-process run: 2 processes, 8 devices (4 on process 0)" in outputs[0][1]
  # Gloo's C++ threads print "[Gloo] Rank N is connected to M peer ranks ..." to stdout, at times split over lines.
  printed = [[line for line in out.splitlines() if "[Gloo]" not in line and "peer ranks" not in line]
             for out, _ in outputs]
  assert printed[1] == [] and "perplexity" in printed[0][-1]  # process 0 alone prints the result (gloo: CPU)

  # SparseGPT through the library: whole and identical on both processes (the same replicated values, read by
  # each), and as the single process's.
  (masks0, kernels0, devices), (masks1, kernels1, _) = _saved_pass(p0 / "sparsegpt.npz"), _saved_pass(
      p1 / "sparsegpt.npz")
  assert devices == [2, 8, 4]  # the pass's mesh spans both processes' devices
  for a, b in ((masks0, masks1), (kernels0, kernels1)):
    for block_a, block_b in zip(a, b):
      assert block_a.keys() == block_b.keys()
      for path in block_a:
        np.testing.assert_array_equal(block_a[path], block_b[path])
  tol.assert_passes_agree(sparsegpt.masks, sparsegpt.params["layers"], masks0,
                          [tree.unflatten({f"{p}/kernel": k for p, k in block.items()}) for block in kernels0],
                          S.kernel_at)


def test_unreachable_coordinator_is_one_line_within_the_timeout(files, capsys):
  with socket.socket() as closed:  # bound, never listening: every connection is refused
    closed.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{closed.getsockname()[1]}"
    start = time.perf_counter()
    code = main(["eval", "--model", str(files / "tiny"), "--data", str(files / "eval.npy"), "--coordinator",
                 address, "--num-processes", "2", "--process-id", "1", "--coordinator-timeout", "1.5"])
    seconds = time.perf_counter() - start
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
  assert f"jaxprune eval: error: cannot reach the coordinator {address} within 1.5 s" in err
  assert 1.5 <= seconds < 5  # the timeout, then the error (not JAX's own initialization timeout of minutes)


@pytest.mark.parametrize("argv, needle", [
    (["--coordinator", "localhost:1234"], "missing num_processes, process_id"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"], "below num_processes 2"),
])
def test_incomplete_or_bad_run_options_are_one_line(files, capsys, argv, needle):
  code = main(["eval", "--model", str(files / "tiny"), "--data", str(files / "eval.npy"), *argv])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and needle in err, err


def test_a_run_is_joined_before_jax_computes():
  jax.devices()  # this process's backend is up
  assert initialize() is False  # automatic: no cluster to join, a single process
  assert initialize("localhost:1234", num_processes=1, process_id=0) is False  # one process needs no runtime
  with pytest.raises(JaxpruneError, match="before any JAX computation"):
    initialize("localhost:1234", num_processes=2, process_id=0, timeout=5)
