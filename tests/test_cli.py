"""The command line on a tiny model: it runs end to end, and bad input gets a one-line error (exit 2)."""
import json
import os
import stat

import numpy as np
import pytest

from jaxprune.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """A tiny random LLaMA in a Hugging Face directory, with the SmolLM2 tokenizer (vocab 49152)."""
  from jaxprune.io._gguf import load_gguf_tokenizer
  from jaxprune.io._load import embedded_path

  path = tmp_path_factory.mktemp("tiny-llama")
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=True)
  transformers.LlamaForCausalLM(cfg).save_pretrained(path)
  load_gguf_tokenizer(embedded_path("smollm2-135m")).save_pretrained(path)
  return path


def run(capsys, *argv):
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def assert_one_line_error(code, err, *needles):
  assert code == 2
  errors = [line for line in err.splitlines() if "error:" in line]
  assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
  for needle in needles:
    assert needle in errors[0], errors[0]


def test_eval_convert_export_end_to_end(tiny_dir, tmp_path, capsys):
  code, out, _ = run(capsys, "eval", "--model", tiny_dir, "--data", "austen", "--seqlen", 64, "--max-windows", 4,
                     "--batch-size", 2, "--json", tmp_path / "e.json")
  assert code == 0
  result = json.loads((tmp_path / "e.json").read_text())
  assert result["command"] == "eval" and result["model"] == str(tiny_dir) and result["out"] is None
  assert {"perplexity", "tokens", "windows", "seqlen", "seconds", "data", "sha256"} <= set(result["eval"])
  ev = result["eval"]
  assert ev["windows"] == 4 and ev["tokens"] == 256 and ev["seqlen"] == 64 and ev["data"] == "austen"
  assert 1000 < result["perplexity"] == ev["perplexity"] < 2 * 49152  # random model: near-uniform over the vocab
  assert run(capsys, "convert", "--model", tiny_dir, "--out", tmp_path / "ck")[0] == 0
  code, _, _ = run(capsys, "eval", "--model", tmp_path / "ck", "--data", "austen", "--seqlen", 64,
                   "--max-windows", 4, "--batch-size", 2, "--json", tmp_path / "e2.json")
  assert code == 0
  again = json.loads((tmp_path / "e2.json").read_text())
  assert again["perplexity"] == pytest.approx(result["perplexity"], rel=1e-6)
  assert run(capsys, "export", "--model", tmp_path / "ck", "--out", tmp_path / "hf")[0] == 0
  assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
  umask = os.umask(0o022)
  os.umask(umask)
  for f in (tmp_path / "hf").iterdir():  # not the 0600 of a temporary file
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_missing_path(capsys):
  assert_one_line_error(*run(capsys, "eval", "--model", "/no/such/model")[::2], "not found")


def test_directory_that_is_not_a_model(tmp_path, capsys):
  assert_one_line_error(*run(capsys, "eval", "--model", tmp_path)[::2], "not a model directory")


def test_gguf_of_unsupported_architecture(tmp_path, capsys):
  import gguf

  path = tmp_path / "m.gguf"
  writer = gguf.GGUFWriter(str(path), "gpt2")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  assert_one_line_error(*run(capsys, "eval", "--model", path)[::2], "architecture 'gpt2' is not supported")


def test_corrupt_gguf(tmp_path, capsys):
  path = tmp_path / "bad.gguf"
  path.write_bytes(b"GGUF" + b"\x00" * 10)
  assert_one_line_error(*run(capsys, "eval", "--model", path)[::2], "not a readable GGUF file")


def test_unknown_corpus_name(tiny_dir, capsys):
  code, _, err = run(capsys, "eval", "--model", tiny_dir, "--data", "shakespeare", "--seqlen", 64)
  assert_one_line_error(code, err, "shakespeare")


def test_seqlen_longer_than_the_model_supports(tiny_dir, capsys):
  assert_one_line_error(*run(capsys, "eval", "--model", tiny_dir, "--seqlen", 4096)[::2], "seqlen 4096",
                        "128")


def test_empty_text_file(tiny_dir, tmp_path, capsys):
  (tmp_path / "empty.txt").write_text("")
  assert_one_line_error(*run(capsys, "eval", "--model", tiny_dir, "--data", tmp_path / "empty.txt",
                             "--seqlen", 64)[::2], "empty")


def test_token_ids_outside_the_vocabulary(tiny_dir, tmp_path, capsys):
  np.save(tmp_path / "w.npy", np.full((2, 64), 60000, np.int32))
  assert_one_line_error(*run(capsys, "eval", "--model", tiny_dir, "--data", tmp_path / "w.npy",
                             "--seqlen", 64)[::2], "60000", "49152")


def test_hub_name_offline_fails_fast(capsys, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  assert_one_line_error(*run(capsys, "eval", "--model", "facebook/opt-125m")[::2], "facebook/opt-125m")


def test_prune_end_to_end_then_eval_and_export(tiny_dir, tmp_path, capsys):
  out = tmp_path / "pruned"
  code, _, _ = run(capsys, "prune", "--model", tiny_dir, "--method", "sparsegpt", "--nm", "2:4", "--calib", "wiki",
                   "--true-sequential", "--nsamples", 4, "--seqlen", 32, "--batch-size", 2, "--out", out,
                   "--eval", "austen", "--eval-seqlen", 32, "--max-eval-windows", 2, "--json", tmp_path / "p.json")
  assert code == 0
  result = json.loads((tmp_path / "p.json").read_text())
  assert result["method"] == "sparsegpt" and result["pattern"] == "2:4" and result["sparsity"] == 0.5
  assert result["true_sequential"] is True
  assert result["perplexity"] > 1 and result["prune_seconds"] > 0 and result["command"] == "prune"
  assert result["eval"]["windows"] == 2 and result["eval"]["seqlen"] == 32 and result["out"] == str(out)
  assert not (tmp_path / "pruned.partial").exists()  # resume state dropped once the checkpoint is written
  assert run(capsys, "eval", "--model", out, "--seqlen", 32, "--max-windows", 2)[0] == 0
  assert run(capsys, "export", "--model", out, "--out", tmp_path / "hf")[0] == 0
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
  w = exported.model.layers[0].mlp.down_proj.weight.detach().numpy()
  assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max() <= 2


@pytest.mark.parametrize("argv, needles", [
    (["--sparsity", "1.0"], ["sparsity must be a number in [0, 1)"]),
    (["--sparsity", "-0.1"], ["sparsity must be a number in [0, 1)"]),
    (["--nm", "3:7"], ["7", "32"]),
    (["--method", "obc"], ["unknown pruning method 'obc'"]),
    (["--method", "wanda", "--rho", "2"], ["--rho does not apply to wanda"]),
    (["--method", "wanda", "--ties", "threshold"], ["--ties does not apply to wanda"]),
    (["--method", "sparsegpt", "--nm", "2:4", "--ties", "threshold"], ["ties='threshold'", "unstructured"]),
    (["--method", "admm", "--rho", "0"], ["rho must be a positive"]),
    (["--method", "magnitude", "--true-sequential"], ["--true-sequential needs calibration"]),
])
def test_prune_bad_options(tiny_dir, tmp_path, capsys, argv, needles):
  code, _, err = run(capsys, "prune", "--model", tiny_dir, "--seqlen", 32, "--nsamples", 2, "--out",
                     tmp_path / "o", *argv)
  assert_one_line_error(code, err, *needles)
  assert not (tmp_path / "o").exists()


def test_prune_calibration_larger_than_the_text(tiny_dir, tmp_path, capsys):
  (tmp_path / "short.txt").write_text("It is a truth universally acknowledged. " * 5)
  code, _, err = run(capsys, "prune", "--model", tiny_dir, "--calib", tmp_path / "short.txt", "--nsamples", 4,
                     "--seqlen", 64, "--out", tmp_path / "o")
  assert_one_line_error(code, err, "64")


def test_prune_refuses_an_existing_directory_that_is_not_a_checkpoint(tiny_dir, tmp_path, capsys):
  (tmp_path / "o").mkdir()
  (tmp_path / "o" / "notes.txt").write_text("mine")
  code, _, err = run(capsys, "prune", "--model", tiny_dir, "--method", "magnitude", "--out", tmp_path / "o")
  assert_one_line_error(code, err, "exists and is not a jaxprune checkpoint")
  assert (tmp_path / "o" / "notes.txt").read_text() == "mine"


def test_corrupt_checkpoint(tiny_dir, tmp_path, capsys):
  assert run(capsys, "convert", "--model", tiny_dir, "--out", tmp_path / "ck")[0] == 0
  for f in (tmp_path / "ck" / "params").rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  assert_one_line_error(*run(capsys, "eval", "--model", tmp_path / "ck")[::2], "corrupt")
  (tmp_path / "ck" / "jaxprune.json").write_text("{not json")
  assert_one_line_error(*run(capsys, "eval", "--model", tmp_path / "ck")[::2], "not a readable jaxprune checkpoint")


@pytest.mark.slow  # 25 s; the pass's own resume is tested in test_sequential and test_dtypes
def test_prune_killed_mid_way_resumes_to_the_same_checkpoint(tiny_dir, tmp_path, capsys):
  import os
  import signal
  import subprocess
  import sys
  import time

  from jaxprune.io import load_checkpoint

  args = ["prune", "--model", str(tiny_dir), "--method", "sparsegpt", "--sparsity", "0.6", "--nsamples", "4",
          "--seqlen", "32", "--batch-size", "2"]
  assert run(capsys, *args, "--out", tmp_path / "whole")[0] == 0
  out = tmp_path / "resumed"
  proc = subprocess.Popen([sys.executable, "-m", "jaxprune", *args, "--out", str(out)], env=dict(os.environ),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  progress = tmp_path / "resumed.partial" / "progress.json"
  deadline = time.time() + 300
  while not progress.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # after the first block, before the second finishes
  proc.wait()
  assert progress.exists() and not out.exists()
  assert json.loads(progress.read_text())["done"] == 1
  assert run(capsys, *args, "--out", out)[0] == 0
  whole, resumed = load_checkpoint(tmp_path / "whole"), load_checkpoint(out)
  assert resumed.metadata["layers"] == whole.metadata["layers"]
  for a, b in zip(jax_leaves(whole.params), jax_leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_commands_keep_compiled_programs_in_a_persistent_cache(tiny_dir, tmp_path):
  """A command fills the compilation cache; the same command again finds every program there (adds nothing)."""
  import os
  import subprocess
  import sys

  def eval_with_cache():
    args = [sys.executable, "-m", "jaxprune", "eval", "--model", str(tiny_dir), "--data", "austen", "--seqlen", "64",
            "--max-windows", "2"]
    proc = subprocess.run(args, env={**os.environ, "JAXPRUNE_COMPILATION_CACHE": str(cache)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return sorted(p.name for p in cache.rglob("*") if p.is_file())

  cache = tmp_path / "cache"
  first = eval_with_cache()
  assert first
  assert eval_with_cache() == first


def test_compilation_cache_folder_from_the_environment(tmp_path, monkeypatch, capsys):
  """Off with ``JAXPRUNE_COMPILATION_CACHE=0``; a path there is used; else ``$XDG_CACHE_HOME/jaxprune/xla``; a
  folder already configured for JAX is kept; an unwritable one turns the cache off, which a command reports in one
  line. (Nothing is compiled while the option is set here, and it is reset after.)"""
  import jax

  from jaxprune._compile_cache import MAX_BYTES, command_line_cache, use_compilation_cache

  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
            jax.config.jax_compilation_cache_max_size)
  monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
  monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
  try:
    monkeypatch.setenv("JAXPRUNE_COMPILATION_CACHE", "0")
    assert use_compilation_cache() is None and jax.config.jax_compilation_cache_dir == before[0]
    monkeypatch.setenv("JAXPRUNE_COMPILATION_CACHE", str(tmp_path / "mine"))
    assert use_compilation_cache() == tmp_path / "mine" and (tmp_path / "mine").is_dir()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert jax.config.jax_compilation_cache_max_size == MAX_BYTES  # filelock comes with transformers
    assert use_compilation_cache(tmp_path / "other") == tmp_path / "mine"  # already configured: kept
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("JAXPRUNE_COMPILATION_CACHE", "")
    assert use_compilation_cache() == tmp_path / "home" / "jaxprune" / "xla"
    jax.config.update("jax_compilation_cache_dir", None)
    (tmp_path / "file").write_text("")
    assert use_compilation_cache(tmp_path / "file" / "xla") is None  # cannot be created
    assert jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv("JAXPRUNE_COMPILATION_CACHE", str(tmp_path / "file" / "xla"))
    assert command_line_cache() is None
    assert capsys.readouterr().err == (f"jaxprune: compilation cache off: cannot create or write "
                                       f"{tmp_path / 'file' / 'xla'} ($JAXPRUNE_COMPILATION_CACHE)\n")
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    jax.config.update("jax_compilation_cache_max_size", before[2])
