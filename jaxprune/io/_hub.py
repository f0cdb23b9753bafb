"""Whether the Hugging Face hub can be used now: the one check behind hub models and hub datasets.

The hub is unavailable when ``HF_HUB_OFFLINE`` (or another offline variable the caller names, such as
``HF_DATASETS_OFFLINE``) is true, or when the host of ``HF_ENDPOINT`` (default ``https://huggingface.co``) does not
accept a TCP connection within :data:`PROBE_TIMEOUT_S` seconds. Callers then fail at once with one line, or use
the local Hugging Face cache, instead of waiting for the HTTP client's retries.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from jaxprune.errors import JaxpruneError

PROBE_TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "on", "yes", "true"}  # huggingface_hub's reading of boolean variables


def hub_endpoint() -> tuple[str, int]:
  """``(host, port)`` of ``HF_ENDPOINT`` (default ``huggingface.co:443``)."""
  endpoint = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
  return endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)


def offline_variable(*also: str) -> str | None:
  """The first of ``HF_HUB_OFFLINE`` and ``also`` that is set to a true value, else None."""
  for var in ("HF_HUB_OFFLINE", *also):
    if os.environ.get(var, "").strip().lower() in _TRUE:
      return var
  return None


def hub_unavailable(*also: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
  """Why the hub cannot be used now (``"HF_HUB_OFFLINE is set"``, ``"huggingface.co:443 is unreachable (...)"``),
  or None when it can. ``also``: further offline variables to honour."""
  var = offline_variable(*also)
  if var is not None:
    return f"{var} is set"
  host, port = hub_endpoint()
  try:
    socket.create_connection((host, port), timeout=timeout).close()
  except OSError as err:
    return f"{host}:{port} is unreachable ({err.strerror or type(err).__name__})"
  return None


def require_hub(what: str, hint: str, *also: str, timeout: float = PROBE_TIMEOUT_S) -> None:
  """Raises one :class:`JaxpruneError` line, ``"{what} needs the Hugging Face hub but {why}; {hint}"``, unless the
  hub can be used."""
  reason = hub_unavailable(*also, timeout=timeout)
  if reason is not None:
    raise JaxpruneError(f"{what} needs the Hugging Face hub but {reason}; {hint}")
