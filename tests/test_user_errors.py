"""What a user meets: one evaluation rule and one JSON layout across subcommands, ``--json -``, ``--version``, and
a one-line error (never a traceback) for each bad input, checked before any work; ``jp.prune``'s input checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tolerances as tol

import jaxprune as jp
from jaxprune.io._checkpoint import read_checkpoint
from jaxprune.prune import _sequential as S
from jaxprune.cli import build_parser, main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random LLaMA (vocab 64, no tokenizer) in a Hugging Face directory, and .npy token windows."""
  root = tmp_path_factory.mktemp("tiny")
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  transformers.LlamaForCausalLM(cfg).save_pretrained(root / "hf")
  rng = np.random.default_rng(0)
  np.save(root / "calib.npy", rng.integers(0, 64, (4, 16)).astype(np.int32))
  np.save(root / "eval.npy", rng.integers(0, 64, (3, 16)).astype(np.int32))
  return root


def run(capsys, *argv):
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def one_line_error(code, err, *needles):
  lines = [line for line in err.splitlines() if "error:" in line]
  assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
  for needle in needles:
    assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------------------ one rule, one layout


def test_eval_prune_and_depth_share_the_evaluation_defaults():
  parser = build_parser()
  common = ["--out", "o"]
  parsed = [parser.parse_args(["eval"]), parser.parse_args(["prune", *common]),
            parser.parse_args(["depth", "--remove", "1", *common])]
  assert {(a.eval_seqlen, a.max_eval_windows) for a in parsed} == {(None, 32)}
  assert parser.parse_args(["prune", *common, "--eval-seqlen", "64"]).eval_seqlen == 64
  assert parser.parse_args(["eval", "--eval-seqlen", "64"]).eval_seqlen == 64


def test_every_command_writes_the_same_layout_and_json_dash_writes_only_json(tiny, tmp_path, capsys):
  base = {"command", "jaxprune_version", "model", "out", "seconds"}
  runs = {
      "eval": ["eval", "--model", tiny / "hf", "--data", tiny / "eval.npy"],
      "convert": ["convert", "--model", tiny / "hf", "--out", tmp_path / "ck"],
      "prune": ["prune", "--model", tmp_path / "ck", "--method", "wanda", "--calib", tiny / "calib.npy",
                "--nsamples", 4, "--seqlen", 16, "--out", tmp_path / "pruned", "--eval", tiny / "eval.npy",
                "--eval-dense"],
      "depth": ["depth", "--model", tmp_path / "ck", "--remove", 1, "--calib", tiny / "calib.npy", "--nsamples", 4,
                "--seqlen", 16, "--out", tmp_path / "shallow", "--eval", tiny / "eval.npy"],
      "export": ["export", "--model", tmp_path / "pruned", "--out", tmp_path / "hf"],
  }
  for command, argv in runs.items():
    code, out, err = run(capsys, *argv, "--json", "-")
    assert code == 0, err
    doc = json.loads(out)  # stdout holds the JSON document and nothing else
    assert base <= set(doc) and doc["command"] == command and doc["jaxprune_version"] == jp.__version__
    if command in ("eval", "prune", "depth"):
      assert doc["eval"]["windows"] == 3 and doc["eval"]["seqlen"] == 16  # the .npy file's own width
      assert doc["perplexity"] == doc["eval"]["perplexity"] > 1
  assert doc["recipe"]["prune"]["method"] == "wanda"
  pruned = json.loads(run(capsys, *runs["prune"][:-1], "--overwrite", "--json", "-")[1])
  assert "eval_dense" not in pruned
  code, out, _ = run(capsys, *runs["eval"])
  assert code == 0 and out.startswith("perplexity ")  # without --json - stdout is for people


def test_prune_reports_dense_and_pruned_perplexity_and_a_layer_table(tiny, tmp_path, capsys):
  code, out, err = run(capsys, "prune", "--model", tiny / "hf", "--method", "magnitude", "--sparsity", 0.5,
                       "--out", tmp_path / "p", "--eval", tiny / "eval.npy", "--eval-dense", "--json",
                       tmp_path / "p.json")
  assert code == 0, err
  doc = json.loads((tmp_path / "p.json").read_text())
  assert doc["dense_perplexity"] == doc["eval_dense"]["perplexity"] != doc["perplexity"]
  table = out.splitlines()
  assert table[0].split() == ["block", "sparsity", "error", "rel.", "error"] and len(table) >= 3
  assert table[1].split()[:2] == ["0", "0.5000"]
  # Magnitude: no statistics, so the relative error is the fraction of each kernel's squared weights removed.
  dense, pruned = jp.load_model(str(tiny / "hf")).params, jp.load_model(str(tmp_path / "p")).params
  for r in doc["layers"]:
    w = np.asarray(S.kernel_at(dense["layers"][r["layer"]], r["name"]), np.float64)
    kept = np.asarray(S.kernel_at(pruned["layers"][r["layer"]], r["name"]))
    want = np.sum(w[kept == 0] ** 2) / np.sum(w ** 2)
    assert r["relative_error"] == pytest.approx(want, rel=tol.LOSS_F32), r
  assert float(table[1].split()[-1]) == pytest.approx(max(r["relative_error"] for r in doc["layers"]
                                                          if r["layer"] == 0), rel=1e-3)


@pytest.mark.parametrize("command", ["eval", "prune", "depth", "retrain"])
def test_a_model_axis_that_does_not_divide_the_devices_is_one_line_before_loading(tiny, tmp_path, capsys, command):
  argv = {"eval": [], "prune": ["--out", tmp_path / "p"], "depth": ["--remove", 1, "--out", tmp_path / "d"],
          "retrain": ["--train", "biases", "--steps", 1, "--out", tmp_path / "r"]}[command]
  code, _, err = run(capsys, command, "--model", tiny / "hf", "--model-axis", 3, *argv)
  one_line_error(code, err, "a model axis of 3 does not divide the 8 devices")
  assert "loaded" not in err and not any(tmp_path.iterdir())


def test_prune_and_eval_on_a_model_axis_equal_the_data_mesh(tiny, tmp_path, capsys):
  """``--model-axis 2`` (a 4 × 2 mesh, parameters sharded over ``model``): the masks, weights and perplexity of the
  default 8-device data mesh; ``eval --model-axis 2`` of the result gives the perplexity ``prune --eval`` gave."""
  from test_multihost import _by_block

  docs = {}
  for axis in (1, 2):
    code, _, err = run(capsys, "prune", "--model", tiny / "hf", "--method", "wanda", "--calib",
                       tiny / "calib.npy", "--nsamples", 4, "--seqlen", 16, "--out", tmp_path / f"p{axis}", "--eval",
                       tiny / "eval.npy", "--model-axis", axis, "--json", tmp_path / f"p{axis}.json")
    assert code == 0, err
    docs[axis] = json.loads((tmp_path / f"p{axis}.json").read_text())
  tol.assert_reordered(docs[2]["perplexity"], docs[1]["perplexity"], "perplexity")
  (_, params1, masks1, _), (_, params2, masks2, _) = (read_checkpoint(tmp_path / f"p{axis}", with_masks=True)
                                                      for axis in (1, 2))
  tol.assert_passes_agree(_by_block(masks2), params2["layers"], _by_block(masks1), params1["layers"], S.kernel_at)
  code, _, err = run(capsys, "eval", "--model", tmp_path / "p2", "--data", tiny / "eval.npy", "--model-axis", 2,
                     "--json", tmp_path / "e2.json")
  assert code == 0, err
  tol.assert_reordered(json.loads((tmp_path / "e2.json").read_text())["perplexity"], docs[2]["perplexity"],
                       "perplexity")


def test_version(capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(["--version"])
  assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"jaxprune {jp.__version__}"
  assert jp.__version__ and jp.__version__ != "0+unknown"


# ------------------------------------------------------------------------------------ one line, before the work


def test_corrupt_orbax_checkpoint_is_one_line_without_asyncio_tracebacks(tiny, tmp_path, capsys):
  assert run(capsys, "convert", "--model", tiny / "hf", "--out", tmp_path / "ck")[0] == 0
  for f in (tmp_path / "ck" / "params" / "ocdbt.process_0" / "d").iterdir():
    if f.stat().st_size > 1000:  # array data, metadata intact: Orbax starts several reads, then one fails
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  # The stray tracebacks come from reads still in flight when the restore fails: a race, so tried four times.
  ck, hf = str(tmp_path / "ck"), str(tmp_path / "hf")
  script = ("import sys; from jaxprune.cli import main; "
            f"codes = [main(argv) for _ in range(2) for argv in (['eval', '--model', {ck!r}], "
            f"['export', '--model', {ck!r}, '--out', {hf!r}])]; "
            "sys.exit(0 if codes == [2, 2, 2, 2] else 1)")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ),
                        timeout=300)
  errors = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert proc.returncode == 0 and len(errors) == 4, proc.stderr
  assert all("checkpoint is corrupt or incomplete" in e for e in errors)
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr
  assert not (tmp_path / "hf").exists()


def test_truncated_safetensors_at_convert(tiny, tmp_path, capsys):
  import shutil

  shutil.copytree(tiny / "hf", tmp_path / "m")
  weights = tmp_path / "m" / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:5000])
  code, _, err = run(capsys, "convert", "--model", tmp_path / "m", "--out", tmp_path / "ck")
  one_line_error(code, err, "model.safetensors is not a readable weight file")
  assert not (tmp_path / "ck").exists()


def test_json_naming_a_directory_fails_before_the_work(tiny, tmp_path, capsys):
  (tmp_path / "j").mkdir()
  code, _, err = run(capsys, "prune", "--model", tiny / "hf", "--method", "magnitude", "--out", tmp_path / "o",
                     "--json", tmp_path / "j")
  one_line_error(code, err, "is a directory")
  assert "loaded" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["j"]


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
    (["prune", "--out", "o", "--nsamples", "-1"], "--nsamples: must be a positive integer, got -1"),
    (["eval", "--max-windows", "-2"], "--max-windows/--max-eval-windows: must be an integer >= 0"),
])
def test_counts_are_checked_by_the_parser(capsys, argv, needle):
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and needle in err and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["convert", "export"])
def test_convert_and_export_check_out_before_loading(tmp_path, capsys, command):
  (tmp_path / "o").mkdir()
  (tmp_path / "o" / "notes.txt").write_text("mine")
  code, _, err = run(capsys, command, "--model", tmp_path / "no-such-model", "--out", tmp_path / "o")
  one_line_error(code, err, str(tmp_path / "o"))
  assert "not found" not in err and (tmp_path / "o" / "notes.txt").read_text() == "mine"


def test_text_file_named_npy(tiny, tmp_path, capsys):
  (tmp_path / "words.npy").write_text("It is a truth universally acknowledged.\n")
  code, _, err = run(capsys, "eval", "--model", tiny / "hf", "--data", tmp_path / "words.npy")
  one_line_error(code, err, "is not a NumPy .npy file", "numpy.save")
  assert "pickle" not in err


# ------------------------------------------------------------------------------------ the Python API


@pytest.fixture(scope="module")
def model(tiny):
  return jp.load_model(str(tiny / "hf"))


@pytest.mark.parametrize("windows, needle", [
    (np.arange(16, dtype=np.int32), "must be a non-empty integer array (n, seqlen >= 2), got shape (16,)"),
    (np.zeros((2, 16), np.float32), "must hold integer token ids, got dtype float32"),
    (np.full((2, 16), 64, np.int32), "token ids must lie in [0, 64)"),
])
def test_prune_checks_its_windows(model, windows, needle):
  with pytest.raises(jp.JaxpruneError) as err:
    jp.prune(model.params, windows, config=model.config, spec=jp.PruneSpec("wanda", jp.Unstructured(0.5)))
  assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("make, needle", [
    (lambda: jp.PruneSpec("obc", jp.Unstructured(0.5)), "unknown pruning method 'obc'"),
    (lambda: jp.PruneSpec("wanda", 0.5), "pattern must be jaxprune.Unstructured(sparsity) or jaxprune.NM(n, m)"),
    (lambda: jp.PruneSpec("admm", jp.NM(2, 4), {"rhoo": 1.0}), "admm takes no option 'rhoo' (its options: rho, "),
    (lambda: jp.PruneSpec("sparsegpt", jp.NM(2, 4), (("blocksize", [64]),)), "must be a hashable value"),
    (lambda: jp.PruneSpec("magnitude", jp.NM(2, 4), true_sequential=True), "true_sequential needs calibration"),
], ids=["method", "pattern", "option", "unhashable", "true-sequential"])
def test_prune_spec_checks_itself_when_constructed(make, needle):
  with pytest.raises(jp.JaxpruneError) as err:
    make()
  assert needle in str(err.value) and "\n" not in str(err.value)


def test_prune_checks_its_spec(model, tiny):
  with pytest.raises(jp.JaxpruneError) as err:
    jp.prune(model.params, np.load(tiny / "calib.npy"), config=model.config, spec="wanda")
  assert "spec must be a jaxprune.PruneSpec" in str(err.value) and "\n" not in str(err.value)


def test_prune_takes_token_windows_and_options_as_a_dict_and_saves_a_loadable_outcome(model, tiny, tmp_path):
  calib = jp.load_windows(str(tiny / "calib.npy"), tokenizer=None, seqlen=None, role="calib", nsamples=4)
  spec = jp.PruneSpec("sparsegpt", jp.NM(2, 4), {"blocksize": 8})
  outcome = jp.prune(model.params, calib, config=model.config, spec=spec, progress=False)
  assert outcome.metadata["hparams"] == {"blocksize": 8} and outcome.metadata["pattern"] == "2:4"
  jp.save_outcome(outcome, tmp_path / "ck", model.config)
  loaded = jp.load_checkpoint(tmp_path / "ck", with_masks=True)
  assert isinstance(loaded, jp.LoadedModel) and loaded.config == model.config
  assert loaded.metadata["method"] == "sparsegpt" and loaded.masks is not None
  again = jp.load_model(str(tmp_path / "ck"))
  np.testing.assert_array_equal(again.params["layers"][1]["mlp"]["down_proj"]["kernel"],
                                loaded.params["layers"][1]["mlp"]["down_proj"]["kernel"])
