"""Files and the hub: atomic writes with ordinary permissions, the one hub check (``HF_ENDPOINT``,
``HF_HUB_OFFLINE``), and hub models loaded from the local Hugging Face cache when offline."""
from __future__ import annotations

import os
import socket
import stat
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.errors import JaxpruneError
from jaxprune.io import _hf as hf, _hub as hub
from jaxprune.io._atomic import atomic_dir, atomic_write

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def _tiny_llama(path, **overrides):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**{**dict(vocab_size=64, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           max_position_embeddings=64), **overrides})
  transformers.LlamaForCausalLM(cfg).save_pretrained(path)
  return path


# ------------------------------------------------------------------------------------ atomic writes


def test_atomic_write_gives_ordinary_permissions_and_leaves_no_temporary(tmp_path):
  path = atomic_write(tmp_path / "sub" / "a.json", '{"x": 1}\n')
  assert path.read_text() == '{"x": 1}\n'
  assert _mode(path) == 0o666 & ~_umask()
  atomic_write(path, lambda f: np.save(f, np.arange(3)))  # replaces, through a function of the open file
  np.testing.assert_array_equal(np.load(path), np.arange(3))
  assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_atomic_write_that_fails_keeps_the_old_file(tmp_path):
  path = atomic_write(tmp_path / "a.txt", "old")

  def broken(f):
    f.write(b"partial")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError):
    atomic_write(path, broken)
  assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_fixes_modes_of_private_files_and_replaces_only_when_asked(tmp_path):
  from safetensors.numpy import save_file

  out = tmp_path / "model"
  with atomic_dir(out) as tmp:
    assert not out.exists()
    save_file({"w": np.zeros(2, np.float32)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
    (tmp / "sub").mkdir(mode=0o700)
  assert _mode(out / "model.safetensors") == 0o666 & ~_umask()
  assert _mode(out) == _mode(out / "sub") == 0o777 & ~_umask()
  with pytest.raises(OSError):
    with atomic_dir(out) as tmp:
      (tmp / "b").write_text("new")
  assert (out / "model.safetensors").is_file()
  with atomic_dir(out, replace=True) as tmp:
    (tmp / "b").write_text("new")
  assert sorted(p.name for p in out.iterdir()) == ["b"]
  with pytest.raises(RuntimeError):
    with atomic_dir(tmp_path / "never") as tmp:
      raise RuntimeError("crash")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ------------------------------------------------------------------------------------ the hub check


@pytest.fixture
def probes(monkeypatch):
  """Records every TCP probe; every connection is refused."""
  seen = []

  def refuse(address, timeout=None):
    seen.append((address, timeout))
    raise OSError(101, "Network is unreachable")

  for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(socket, "create_connection", refuse)
  return seen


def test_hub_endpoint_is_honoured_by_models_and_datasets(probes, monkeypatch):
  from jaxprune.data import load_windows

  monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
  monkeypatch.setattr(hf, "cached_hub_model", lambda name: None)
  with pytest.raises(JaxpruneError, match="mirror.example:8080 is unreachable") as model_err:
    hf.download_hub_model("org/tiny")
  with pytest.raises(JaxpruneError, match="mirror.example:8080 is unreachable") as data_err:
    load_windows("wikitext2", tokenizer=object(), seqlen=8, role="eval")
  assert probes == [(("mirror.example", 8080), hub.PROBE_TIMEOUT_S)] * 2 and hub.PROBE_TIMEOUT_S <= 5
  for err in (model_err, data_err):
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value, offline", [("1", True), ("TRUE", True), ("yes", True), ("0", False), ("", False)])
def test_hf_hub_offline_values(probes, monkeypatch, value, offline):
  monkeypatch.setenv("HF_HUB_OFFLINE", value)
  reason = hub.hub_unavailable()
  assert (reason == "HF_HUB_OFFLINE is set") == offline
  assert len(probes) == (0 if offline else 1)


def _fake_cache_entry(home, name: str, source) -> None:
  """What ``snapshot_download`` leaves in ``$HF_HOME/hub``: a ref and a snapshot holding the files."""
  commit = "0123456789abcdef0123456789abcdef01234567"
  repo = home / "hub" / f"models--{name.replace('/', '--')}"
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(commit)
  snapshot = repo / "snapshots" / commit
  snapshot.mkdir(parents=True)
  for f in source.iterdir():
    (snapshot / f.name).write_bytes(f.read_bytes())


def test_offline_hub_model_loads_from_the_hugging_face_cache(tmp_path, monkeypatch):
  import huggingface_hub.constants

  from jaxprune.io import load_model

  home = tmp_path / "hf-home"
  _fake_cache_entry(home, "org/tiny", _tiny_llama(tmp_path / "src"))
  monkeypatch.setenv("HF_HOME", str(home))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  # huggingface_hub reads HF_HOME once, at its import; a fresh process would see the variable itself.
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
  monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("no network access offline"))
  model = load_model("org/tiny")
  reference = hf.load_hf_dir(tmp_path / "src")[1]
  np.testing.assert_array_equal(model.params["layers"][0]["mlp"]["down_proj"]["kernel"],
                                reference["layers"][0]["mlp"]["down_proj"]["kernel"])
  start = time.perf_counter()
  with pytest.raises(JaxpruneError, match="HF_HUB_OFFLINE is set, and it is not in the local") as err:
    load_model("org/absent")
  assert time.perf_counter() - start < 3 and "\n" not in str(err.value)


@pytest.mark.parametrize("dtype", [None, np.float32])
def test_transposed_copies_in_tiles_what_numpy_transposes(dtype):
  from jaxprune.models._convert import TRANSPOSE_TILE, transposed

  rng = np.random.default_rng(0)
  matrix = rng.standard_normal((TRANSPOSE_TILE * 2 + 3, TRANSPOSE_TILE + 45), np.float32).astype(jnp.bfloat16)
  out = transposed(matrix, dtype)
  assert out.flags.c_contiguous and out.dtype == (matrix.dtype if dtype is None else dtype)
  np.testing.assert_array_equal(out, np.ascontiguousarray(matrix.T).astype(out.dtype))
