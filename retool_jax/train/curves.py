"""Training curves: one panel per metric of a run folder's `metrics.jsonl` against the step, as a PNG.

Every trainer's loop draws `RUN_DIR/curves.png` at the end of a run (`config.log.curves`);
`python -m retool_jax.plot RUN_DIR` redraws it, or a chosen set of metrics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from retool_jax.train.metrics import METRICS_FILE, WALL_CLOCK_PREFIXES, read_metrics

CURVES_FILE = "curves.png"


def series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
  """`{metric: (steps, values)}` for every numeric metric."""
  out: dict[str, tuple[list[int], list[float]]] = {}
  for r in records:
    for k, v in r.items():
      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
        steps, values = out.setdefault(k, ([], []))
        steps.append(r["step"])
        values.append(float(v))
  return out


def plot_run(run_dir: str | Path, out: str | Path | None = None, keys: Sequence[str] | None = None) -> Path:
  """Renders the curves of a run folder into a PNG and returns its path."""
  import matplotlib  # noqa: PLC0415  (loaded, and its backend chosen, only when a plot is drawn)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  run_dir = Path(run_dir)
  if not (run_dir / METRICS_FILE).exists():
    raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}")
  data = series(read_metrics(run_dir))
  if keys:
    missing = [k for k in keys if k not in data]
    if missing:
      raise ValueError(f"{run_dir / METRICS_FILE}: no metric {missing}; have {sorted(data)}")
    names = list(keys)
  else:
    names = sorted(data, key=lambda k: (k.startswith(WALL_CLOCK_PREFIXES), k))
  if not names:
    raise ValueError(f"{run_dir / METRICS_FILE}: no numeric metrics to plot")
  cols = min(3, len(names))
  rows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    steps, values = data[name]
    ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(names) :]:
    ax.axis("off")
  fig.suptitle(run_dir.name)
  fig.tight_layout()
  out = Path(out) if out else run_dir / CURVES_FILE
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
