"""Reading and writing models: jaxprune (Orbax) checkpoints, Hugging Face directories, GGUF files."""
from jaxprune.io._checkpoint import is_checkpoint, save_checkpoint
from jaxprune.io._hf import is_hf_dir, load_hf_dir, save_hf_dir
from jaxprune.io._gguf import load_gguf
from jaxprune.io._load import LoadedModel, embedded_path, load_checkpoint, load_model

__all__ = [
    "LoadedModel", "embedded_path", "is_checkpoint", "is_hf_dir", "load_checkpoint", "load_gguf", "load_hf_dir",
    "load_model", "save_checkpoint", "save_hf_dir",
]
