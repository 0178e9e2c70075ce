"""Training curves: `python -m retool_jax.plot RUN_DIR [--out FILE] [--keys loss,eval_loss]` -> a PNG.

Reads `RUN_DIR/metrics.jsonl` and draws one panel per metric against the step (default: every numeric
metric; wall-clock `perf/` and `time/` figures last). Writes `RUN_DIR/curves.png` unless `--out` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from retool_jax.train.curves import plot_run, series

__all__ = ["main", "plot_run", "series"]


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m retool_jax.plot", description=__doc__.split("\n\n")[0])
  p.add_argument("run_dir", help="a training run folder (holding metrics.jsonl)")
  p.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png)")
  p.add_argument("--keys", help="comma-separated metrics to draw (default: all)")
  args = p.parse_args(argv)
  try:
    path = plot_run(args.run_dir, args.out, [k for k in args.keys.split(",") if k] if args.keys else None)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
