"""Answer equivalence: strict (normalised exact match) and lenient (``math-verify``), with a deadline.

Lenient checks first try cheap in-process rules -- normalised strings equal, or two plain numbers
compared by value -- and only hand the rest to ``math-verify``, which runs in worker subprocesses.
A check that outlives the deadline kills its worker (a fresh one starts on the next call) and counts
as not equivalent. Unlike math-verify's own ``signal.alarm`` timeout, this works from any thread.
Verdicts are cached, since a GRPO group repeats the same answers many times.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
from typing import Literal, NamedTuple

from retool_jax.rewards import extract, normalize

Mode = Literal["strict", "lenient"]
MODES = ("strict", "lenient")
_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "verify_worker.py")


class Verdict(NamedTuple):
  """Outcome of one equivalence check.

  ``timed_out`` means the check did not finish: its deadline passed or its worker died. Such a
  verdict is never ``correct``.
  """

  correct: bool
  timed_out: bool = False


class _Worker:
  """One ``verify_worker.py`` subprocess, started on first use and after every kill."""

  def __init__(self, startup_timeout_s: float):
    self._startup_timeout_s = startup_timeout_s
    self._proc: subprocess.Popen | None = None
    self._buffer = b""

  def ask(self, gold: str, prediction: str, timeout_s: float) -> bool | None:
    """math-verify's verdict, or None if it did not come within ``timeout_s`` (or the worker died)."""
    if self._proc is None or self._proc.poll() is not None:
      self._start()
    request = json.dumps([gold, prediction]) + "\n"
    try:
      self._proc.stdin.write(request.encode())
      self._proc.stdin.flush()
      line = self._read_line(time.monotonic() + timeout_s)
    except (BrokenPipeError, EOFError):
      logging.getLogger(__name__).warning(
        "the math-verify worker exited during a check; counted as not equivalent"
      )
      line = None
    if line is None:
      self.close()
      return None
    equivalent, _error = json.loads(line)
    return bool(equivalent)

  def _start(self) -> None:
    self._buffer = b""
    self._proc = subprocess.Popen(
      [sys.executable, _WORKER_SCRIPT],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      bufsize=0,
      start_new_session=True,  # Ctrl-C in the parent does not reach the worker
    )
    try:
      ready = self._read_line(time.monotonic() + self._startup_timeout_s)
    except EOFError:
      ready = None
    if ready is None or json.loads(ready) != "ready":
      self.close()
      raise RuntimeError(
        f"the math-verify worker ({_WORKER_SCRIPT}) did not start within "
        f"{self._startup_timeout_s} s; is math-verify installed?"
      )

  def _read_line(self, deadline: float) -> bytes | None:
    fd = self._proc.stdout.fileno()
    while b"\n" not in self._buffer:
      remaining = deadline - time.monotonic()
      if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
        return None
      chunk = os.read(fd, 1 << 16)
      if not chunk:
        raise EOFError
      self._buffer += chunk
    line, self._buffer = self._buffer.split(b"\n", 1)
    return line

  def close(self) -> None:
    if self._proc is not None:
      self._proc.kill()
      self._proc.wait()
      for stream in (self._proc.stdin, self._proc.stdout):
        stream.close()
      self._proc = None


class Verifier:
  """Thread-safe answer-equivalence checker.

  Args:
    timeout_s: deadline for one lenient (math-verify) check, in seconds.
    num_workers: math-verify subprocesses; calls from more threads than this wait their turn.
    cache_size: number of verdicts kept.
    startup_timeout_s: how long a worker may take to start.
  """

  def __init__(
    self,
    timeout_s: float = 5.0,
    num_workers: int = 1,
    cache_size: int = 1 << 16,
    startup_timeout_s: float = 120.0,
  ):
    if timeout_s <= 0:
      raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if num_workers < 1:
      raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    self.timeout_s = timeout_s
    self.num_workers = num_workers
    self._workers: list[_Worker] = [_Worker(startup_timeout_s) for _ in range(num_workers)]
    self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
    for worker in self._workers:
      self._idle.put(worker)
    self._cached = functools.lru_cache(maxsize=cache_size)(self._check)

  def equivalent(self, prediction: str, ground_truth: str, mode: Mode = "lenient") -> Verdict:
    """Whether the extracted ``prediction`` equals ``ground_truth`` under ``mode``."""
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(prediction, str) or not isinstance(ground_truth, str):
      raise TypeError(
        "prediction and ground_truth must be str, got "
        f"{type(prediction).__name__} and {type(ground_truth).__name__}"
      )
    return self._cached(prediction.strip(), ground_truth.strip(), mode)

  def _check(self, prediction: str, ground_truth: str, mode: Mode) -> Verdict:
    if not prediction or not ground_truth:
      return Verdict(False)
    pred, gold = normalize.normalize_answer(prediction), normalize.normalize_answer(ground_truth)
    if gold and pred == gold:
      return Verdict(True)
    if mode == "strict":
      return Verdict(False)
    pred_value, gold_value = normalize.as_number(pred), normalize.as_number(gold)
    if pred_value is not None and gold_value is not None:
      if pred_value == gold_value:
        return Verdict(True)
      if pred_value == pred_value.to_integral() and gold_value == gold_value.to_integral():
        return Verdict(False)  # distinct integers; decimals fall through to rounding rules
    worker = self._idle.get()
    try:
      result = worker.ask(ground_truth, prediction, self.timeout_s)
    finally:
      self._idle.put(worker)
    return Verdict(False, timed_out=True) if result is None else Verdict(result)

  def clear_cache(self) -> None:
    """Forgets every cached verdict."""
    self._cached.cache_clear()

  def close(self) -> None:
    """Stops the worker processes (they restart if the verifier is used again)."""
    for worker in self._workers:
      worker.close()


_default: Verifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> Verifier:
  """The process-wide verifier used when none is given."""
  global _default
  with _default_lock:
    if _default is None:
      _default = Verifier()
      atexit.register(_default.close)
    return _default


def is_correct(
  response: str,
  ground_truth: str,
  mode: Mode = "lenient",
  *,
  verifier: Verifier | None = None,
) -> bool:
  """Whether the final answer in ``response`` equals ``ground_truth``.

  The answer is the last ``\\boxed{}``, ``<answer>`` tag or ``Answer:`` line (see
  :func:`retool_jax.rewards.extract.extract_answer`); a response without one is incorrect.
  ``mode="strict"`` compares normalised strings (as DAPO); ``"lenient"`` also accepts
  mathematically equivalent forms via ``math-verify``.
  """
  return judge(response, ground_truth, mode, verifier=verifier)[1].correct


def judge(
  response: str,
  ground_truth: str,
  mode: Mode = "lenient",
  *,
  verifier: Verifier | None = None,
) -> tuple[extract.Extraction | None, Verdict]:
  """The extracted answer of ``response`` and its verdict against ``ground_truth``."""
  if not isinstance(ground_truth, str):
    raise TypeError(f"ground_truth must be a str, got {type(ground_truth).__name__}")
  extraction = extract.extract_answer(response)
  if extraction is None:
    return None, Verdict(False)
  verifier = verifier or default_verifier()
  return extraction, verifier.equivalent(extraction.answer, ground_truth, mode)
