"""Training metrics: one JSON line per logged step (`metrics.jsonl`) plus TensorBoard event files.

On resume from step `s`, lines for steps after `s` (written before the run died, and about to be recomputed)
are dropped and TensorBoard is told to purge them, so a resumed run's records equal an uninterrupted run's.
Keys starting with `perf/` or `time/` are wall-clock figures (throughput, step and phase times) and naturally
differ between runs; `without_wall_clock` drops them. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
PERF_PREFIX = "perf/"
WALL_CLOCK_PREFIXES = (PERF_PREFIX, "time/")


def without_wall_clock(record: Mapping[str, Any]) -> dict[str, Any]:
  """`record` without its wall-clock figures: what two runs of the same config must agree on."""
  return {k: v for k, v in record.items() if not k.startswith(WALL_CLOCK_PREFIXES)}


def _plain(value: Any) -> Any:
  value = np.asarray(jax.device_get(value))
  if value.ndim:
    raise ValueError(f"metrics must be scalars, got shape {value.shape}")
  value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN / Infinity
  return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a `metrics.jsonl` (or of the run folder holding it); an unfinished last line is skipped."""
  path = Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  records = []
  with open(path) as f:
    for line in f:
      if line.endswith("\n"):
        records.append(json.loads(line))
  return records


def truncate_after(path: Path, step: int) -> None:
  """Keeps the records of steps `<= step` (and drops a line cut short by a crash)."""
  if not path.exists():
    return
  kept = [r for r in read_metrics(path) if r["step"] <= step]
  tmp = path.with_suffix(".tmp")
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(tmp, path)


class MetricsWriter:
  """Writes scalar metrics by step to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/`."""

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None, tensorboard: bool = True):
    self.workdir = Path(workdir)
    self.active = jax.process_index() == 0
    self._tb = None
    self._file = None
    if not self.active:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.path = self.workdir / METRICS_FILE
    if resume_step is None:
      self.path.unlink(missing_ok=True)
    else:
      truncate_after(self.path, resume_step)
    self._file = open(self.path, "a")
    if tensorboard:
      purge = None if resume_step is None else resume_step + 1
      # one event file per (re)start; the suffix keeps two starts in the same second apart
      self._tb = SummaryWriter(
        str(self.workdir / "tensorboard"),
        purge_step=purge,
        flush_secs=30,
        filename_suffix=f".{os.getpid()}.{purge or 0}",
      )

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.active:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in sorted(metrics.items())}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
