"""Asynchronous RL against the synchronous step, one run: the same recipe with `rl.max_staleness` 0, 1 and 2.

Each setting trains `--steps` RL steps as its own process (`python -m retool_jax.train`, so no setting reuses
another's compiled programs) from the same start, then `retool_jax.evaluate` scores its checkpoint on the
held-out problems. Reported per setting: steps per hour and tokens per second (over the steps after the first,
which compiles), the producer's and the trainer's busy fractions, the mean staleness and off-policy token
fraction, and the held-out accuracy; then the ratios against the synchronous run.

The default recipe is the demo's GRPO with the sandboxed interpreter (`configs/demo_rl.py`, after `make demo` has
written its data and SFT checkpoint); any RL config works with `--config` and a matching `--eval-config`.

    python bench/rl_async.py [--steps 8] [--staleness 0 1 2] [--config configs/demo_rl.py]
                             [--eval-config configs/eval_demo.py] [--out /tmp/rl_async]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], log: Path) -> float:
  t0 = time.perf_counter()
  with open(log, "w") as f:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False)
  if proc.returncode:
    raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}); see {log}")
  return time.perf_counter() - t0


def setting(k: int, a: argparse.Namespace, out: Path) -> dict[str, float]:
  work = out / f"k{k}"
  wall = run(
    [
      "-m",
      "retool_jax.train",
      f"--config={a.config}",
      f"--config.workdir={work}",
      f"--config.num_steps={a.steps}",
      f"--config.rl.max_staleness={k}",
      f"--config.checkpoint.every_steps={a.steps}",
      "--config.log.every_steps=1",
    ],
    out / f"train_k{k}.log",
  )
  run(
    [
      "-m",
      "retool_jax.evaluate",
      f"--config={a.eval_config}",
      f"--config.model.checkpoint={work / 'checkpoints'}",
      f"--config.workdir={out / f'eval_k{k}'}",
    ],
    out / f"eval_k{k}.log",
  )
  records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
  summary = json.loads((out / f"eval_k{k}" / "summary.json").read_text())
  later = records[1:] or records
  step_s = float(np.mean([r["perf/step_time_s"] for r in later]))
  if k:
    producer = float(later[-1]["async/producer_busy"])
    trainer = float(later[-1]["async/trainer_busy"])
    staleness = float(np.mean([r["async/staleness_mean"] for r in later]))
    off_policy = float(np.mean([r["async/off_policy_token_frac"] for r in later]))
  else:  # the synchronous step: the engine works during the rollout, the trainer after it
    rollout = float(np.sum([r["time/rollout"] for r in later]))
    total = float(np.sum([r["perf/step_time_s"] for r in later]))
    producer, trainer, staleness, off_policy = rollout / total, 1 - rollout / total, 0.0, 0.0
  accuracy_key = next(key for key in summary if key.startswith("avg@"))
  return {
    "steps_per_hour": 3600.0 / step_s,
    "tokens_per_s": float(np.mean([r["perf/tokens_per_s"] for r in later])),
    "producer_busy": producer,
    "trainer_busy": trainer,
    "staleness_mean": staleness,
    "off_policy_token_frac": off_policy,
    "heldout_accuracy": float(summary[accuracy_key]),
    "wall_s": wall,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/demo_rl.py")
  parser.add_argument("--eval-config", default="configs/eval_demo.py")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--out", default="/tmp/rl_async")
  a = parser.parse_args()
  if a.staleness[0] != 0:
    raise SystemExit("--staleness must start with 0: the synchronous run is the baseline")
  out = Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  rows = {k: setting(k, a, out) for k in a.staleness}
  base = rows[0]
  print(f"{a.config}, {a.steps} RL steps each (steps after the first timed), held-out: {a.eval_config}\n")
  print(
    "| max_staleness | steps/h | x sync | tokens/s | producer busy | trainer busy | staleness | off-policy "
    "tokens | held-out acc | acc - sync |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for k, r in rows.items():
    print(
      f"| {k} | {r['steps_per_hour']:.0f} | {r['steps_per_hour'] / base['steps_per_hour']:.2f}x "
      f"| {r['tokens_per_s']:.0f} | {r['producer_busy']:.2f} | {r['trainer_busy']:.2f} | {r['staleness_mean']:.2f} "
      f"| {r['off_policy_token_frac']:.2f} | {r['heldout_accuracy']:.3f} "
      f"| {r['heldout_accuracy'] - base['heldout_accuracy']:+.3f} |"
    )
  (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
  main()
