"""Helpers for tests that run training in a subprocess and kill it."""

import signal
import subprocess
import time
from pathlib import Path

from retool_jax.train.metrics import read_metrics


def wait_for_step(path: Path, step: int, proc: subprocess.Popen, timeout: float = 300.0) -> None:
  """Waits until `path` (a metrics.jsonl) holds step `step`; fails if the process exits first or time runs out."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if path.exists() and any(r["step"] >= step for r in read_metrics(path)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"training exited with {proc.returncode} before step {step}:\n{proc.stderr.read()}")
    time.sleep(0.02)
  raise AssertionError(f"no step {step} within {timeout}s")


def sigkill_after_step(proc: subprocess.Popen, path: Path, step: int, delay: float = 0.0, timeout: float = 300.0):
  """Kills `proc` with SIGKILL `delay` seconds after `path` shows step `step`, and checks that it died of it."""
  try:
    wait_for_step(path, step, proc, timeout)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
