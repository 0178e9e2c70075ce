"""Helpers for tests that run training in a subprocess and kill it."""

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
