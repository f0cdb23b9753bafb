"""The Colab notebooks: stripped of outputs, each with a parameters cell, a Colab-only install cell, a backend check
and a README badge; and each runs top to bottom on CPU (``slow``) with tiny settings injected after its parameters
cell, on a tiny random LLaMA in a Hugging Face directory."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
NAMES = [p.name for p in NOTEBOOKS]


def _read(path: Path):
  return nbformat.read(path, as_version=4)


def _parameters_index(nb) -> int:
  tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
  assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
  return tagged[0]


def test_every_notebook_is_listed():
  assert set(NAMES) == {"quickstart.ipynb", "gpu.ipynb", "tpu.ipynb", "depth.ipynb"}


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stripped_and_has_parameters_install_and_backend_cells(name):
  nb = _read(REPO / "colab" / name)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs not stripped"
  code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
  params = nb.cells[_parameters_index(nb)].source
  assert re.search(r"^MODEL = ", params, re.M) and re.search(r'^JAXPRUNE = "git\+https://', params, re.M)
  install = [src for src in code if "pip" in src]
  assert len(install) == 1 and 'find_spec("google.colab") is not None' in install[0], f"{name}: install cell"
  assert any("jax.default_backend()" in src for src in code), f"{name}: backend check"
  assert code.index(install[0]) < next(i for i, src in enumerate(code) if "jax.default_backend()" in src)


def test_readme_has_an_open_in_colab_badge_per_notebook():
  readme = (REPO / "README.md").read_text()
  for name in NAMES:
    assert re.search(r"\(https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/main/colab/"
                     + re.escape(name) + r"\)", readme), name


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """A tiny random LLaMA in a Hugging Face directory, with the SmolLM2 tokenizer (vocab 49152)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
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


def tiny_parameters(model: Path, out: Path) -> str:
  """The cell injected after a notebook's parameters cell: the tiny model and sizes (names a notebook does not
  use are harmless)."""
  return "\n".join([
      "# Injected by tests/test_notebooks.py: tiny settings for CPU.",
      f"MODEL = {str(model)!r}",
      "NSAMPLES, SEQLEN, EVAL_WINDOWS, BATCH_SIZE = 4, 32, 2, 2",
      "REMOVE = [1]",
      f"OUT = {str(out)!r}",
  ])


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_with_tiny_settings(name, tiny_dir, tmp_path, monkeypatch):
  """Runs under strict dtype promotion, with the test session's 8 simulated CPU devices and no network; the
  notebook writes its checkpoints and exports under ``tmp_path``."""
  nbclient = pytest.importorskip("nbclient")
  nb = _read(REPO / "colab" / name)
  nb.cells.insert(_parameters_index(nb) + 1, nbformat.v4.new_code_cell(tiny_parameters(tiny_dir, tmp_path / "runs")))
  monkeypatch.setenv("JAX_NUMPY_DTYPE_PROMOTION", "strict")
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
  assert "not on Colab" in outputs
  written = sorted(p.name for p in (tmp_path / "runs").iterdir())
  assert written and all((tmp_path / "runs" / p / ("config.json" if p.endswith("-hf") else "jaxprune.json"))
                         .is_file() for p in written), written
  assert np.isfinite([float(x) for x in re.findall(r"perplexity (\d+\.\d+)", outputs)]).all()
