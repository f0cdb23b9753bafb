"""The one exception type users see: a problem with their input, stated in one line."""


class JaxpruneError(ValueError):
  """Bad user input (path, model, data, option). The CLI prints ``str(err)`` as one line and exits 2."""
