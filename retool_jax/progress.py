"""Progress bars that suit where they are written: a live tqdm bar on a terminal, plain lines in a log.

    with progress_bar(total=500, desc="sft") as bar:
      for step in ...:
        bar.set_postfix({"loss": "0.1234"}, refresh=False)
        bar.update(1)

On a terminal the bar redraws in place. Written to a file or a pipe (a CI log, `nohup`, a pod worker's log),
the same figures (`desc: 24% 120/500 [00:37<01:58, 3.21it/s, loss=0.1234]`) are printed as one plain line
every `every_steps` steps or `every_s` seconds, whichever comes first, and once more at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from tqdm.auto import tqdm

LINES_PER_BAR = 20  # default step interval: about this many lines over the whole bar
EVERY_S = 60.0  # and at least one line a minute while steps arrive
LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class LineProgress:
  """tqdm's figures as plain lines: `update`, `set_postfix`, `close` and `with` as on a tqdm bar."""

  def __init__(
    self,
    total: int,
    *,
    desc: str = "",
    initial: int = 0,
    unit: str = "it",
    file: IO[str] | None = None,
    every_steps: int | None = None,
    every_s: float = EVERY_S,
    disable: bool = False,
  ):
    self.total, self.desc, self.n, self.unit = total, desc, initial, unit
    self.file = file if file is not None else sys.stderr
    self.every_steps = every_steps or max(1, -(-total // LINES_PER_BAR))
    self.every_s = every_s
    self.disable = disable
    self.postfix = ""
    self._start = self._last_time = time.monotonic()
    self._initial = self._last_n = initial
    self._closed = False

  def __enter__(self) -> LineProgress:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def set_postfix(
    self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any
  ) -> None:
    """The figures after the rate, as tqdm shows them (`k=v, ...`); `refresh` prints now if a line is due."""
    items = {**(ordered_dict or {}), **kwargs}
    self.postfix = ", ".join(f"{k}={str(v).strip()}" for k, v in items.items())
    if refresh:
      self._maybe_print()

  def update(self, n: int = 1) -> None:
    self.n += n
    self._maybe_print()

  def close(self) -> None:
    """Prints the last line (unless it was just printed)."""
    if not self._closed and self.n != self._last_n:
      self._print()
    self._closed = True

  def line(self) -> str:
    """The current figures in one line."""
    elapsed = time.monotonic() - self._start
    rate = (self.n - self._initial) / elapsed if elapsed > 0 else None
    return tqdm.format_meter(
      self.n,
      self.total,
      elapsed,
      prefix=self.desc,
      unit=self.unit,
      rate=rate,
      postfix=self.postfix or None,
      initial=self._initial,
      bar_format=LINE_FORMAT if self.desc else LINE_FORMAT.removeprefix("{desc}: "),
    )

  def _maybe_print(self) -> None:
    due_steps = self.n - self._last_n >= self.every_steps
    due_time = time.monotonic() - self._last_time >= self.every_s and self.n != self._last_n
    if due_steps or due_time or self.n == self.total:
      self._print()

  def _print(self) -> None:
    self._last_n, self._last_time = self.n, time.monotonic()
    if self.disable or self._closed:
      return
    print(self.line(), file=self.file, flush=True)


def is_terminal(file: IO[str]) -> bool:
  isatty = getattr(file, "isatty", None)
  try:
    return bool(isatty and isatty())
  except ValueError:  # a closed stream
    return False


def progress_bar(
  total: int,
  *,
  desc: str = "",
  initial: int = 0,
  unit: str = "it",
  disable: bool = False,
  file: IO[str] | None = None,
  every_steps: int | None = None,
  every_s: float = EVERY_S,
) -> Any:
  """A tqdm bar when `file` (default stderr) is a terminal, else a `LineProgress` with the same figures."""
  file = file if file is not None else sys.stderr
  if is_terminal(file):
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=file, dynamic_ncols=True)
  return LineProgress(
    total,
    desc=desc,
    initial=initial,
    unit=unit,
    file=file,
    every_steps=every_steps,
    every_s=every_s,
    disable=disable,
  )
