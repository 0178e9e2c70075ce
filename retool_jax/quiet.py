"""Start-up messages that do not concern this package's users, filtered where they are logged.

transformers announces "PyTorch was not found. Models won't be available ..." when it is imported without torch;
the package uses only its tokenizers, so the line is dropped. Every other transformers message passes.
"""

from __future__ import annotations

import logging

NO_TORCH_ADVICE = "PyTorch was not found."


class _DropMessages(logging.Filter):
  def __init__(self, prefixes: tuple[str, ...]):
    super().__init__()
    self.prefixes = prefixes

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.prefixes)


def install() -> None:
  """Adds the filter to the `transformers` logger (once; before or after transformers is imported)."""
  logger = logging.getLogger("transformers")
  if not any(isinstance(f, _DropMessages) for f in logger.filters):
    logger.addFilter(_DropMessages((NO_TORCH_ADVICE,)))
