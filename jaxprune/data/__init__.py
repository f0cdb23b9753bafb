"""Text and token windows for calibration and evaluation.

text (bundled corpus, file or hub dataset) -> tokens (tokenized once, cached) -> windows ``[n, seqlen]``.
"""
from jaxprune.data._corpora import BUNDLED, HUB, load_text
from jaxprune.data._loading import TokenWindows, load_windows, tokenize
from jaxprune.data._windows import calibration_starts, calibration_windows, eval_windows, tokens_sha256

__all__ = [
    "BUNDLED",
    "HUB",
    "TokenWindows",
    "calibration_starts",
    "calibration_windows",
    "eval_windows",
    "load_text",
    "load_windows",
    "tokenize",
    "tokens_sha256",
]
