"""The embedded SmolLM2-135M: its torch-free tokenizer equals transformers'; jaxprune's perplexity equals
transformers' on the same windows (to float32 rounding, ``tolerances.PERPLEXITY_VS_TORCH``) and survives export.

The two perplexity tests load the 135M-parameter model in both frameworks (about 1.5 min on 2 cores): they are
``slow`` (``python -m pytest -m slow``); the model code's parity with transformers is tested on small random
models in ``test_models.py`` in the default run.
"""
import numpy as np
import pytest
import tolerances as tol

from jaxprune import load_model, load_text, load_windows, perplexity, save_hf_dir
from jaxprune.io import embedded_path
from jaxprune.io._gguf import load_gguf_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to read GGUF files


@pytest.fixture(scope="module")
def smollm():
  return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def tokenizer():
  """The tokenizer ``load_model("smollm2-135m").tokenizer`` returns, read from the GGUF file without torch."""
  return load_gguf_tokenizer(embedded_path("smollm2-135m"))


@pytest.fixture(scope="module")
def windows(tokenizer):
  return load_windows("austen", tokenizer=tokenizer, seqlen=256, role="eval", max_windows=4).tokens


@pytest.fixture(scope="module")
def ours(smollm, windows):
  """jaxprune's perplexity of the windows, as the library computes it by default (computed once)."""
  return perplexity(smollm.params, windows, config=smollm.config, progress=False).perplexity


def torch_perplexity(model, windows: np.ndarray) -> float:
  """The reference formula, written independently: exp(mean over windows of the mean shifted CE)."""
  torch.set_num_threads(2)
  ids = torch.tensor(windows, dtype=torch.long)
  with torch.no_grad():
    logits = model(ids).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)
  return float(torch.exp(nll.mean()))


@pytest.mark.slow
def test_perplexity_equals_transformers_reading_the_same_gguf(windows, ours):
  path = embedded_path("smollm2-135m")
  reference = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                dtype=torch.float32).eval()
  expected = torch_perplexity(reference, windows)
  assert 5 < expected < 100
  assert ours == pytest.approx(expected, rel=tol.PERPLEXITY_VS_TORCH)


@pytest.mark.slow
def test_export_to_transformers_round_trips_the_perplexity(smollm, windows, ours, tmp_path):
  save_hf_dir(tmp_path / "hf", smollm.config, smollm.params, smollm.tokenizer)
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
  assert torch_perplexity(exported, windows) == pytest.approx(ours, rel=tol.PERPLEXITY_VS_TORCH)
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  assert tok.encode("Pride and Prejudice", add_special_tokens=False) == smollm.tokenizer.encode(
      "Pride and Prejudice", add_special_tokens=False)


def test_torch_free_gguf_tokenizer_equals_transformers(tokenizer):
  path = embedded_path("smollm2-135m")
  reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  for corpus in ("wiki", "austen"):
    text = load_text(corpus)[:100_000]
    assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
  chat = "<|im_start|>user\nWhat is 1234 + 5678?<|im_end|>"
  assert tokenizer.encode(chat) == reference.encode(chat)
  assert tokenizer.decode(tokenizer.encode(chat)) == chat
  assert (tokenizer.bos_token, tokenizer.eos_token) == (reference.bos_token, reference.eos_token)
