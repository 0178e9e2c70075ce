"""A tiny SFT run killed with SIGKILL mid-run and resumed logs exactly the metrics of an uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retool_jax.train.metrics import PERF_PREFIX, read_metrics
from training_process import sigkill_after_step

ROOT = Path(__file__).resolve().parents[1]
NUM_STEPS = 14


def _command(workdir: Path) -> list[str]:
  return [
    sys.executable,
    "-m",
    "retool_jax.train",
    "--config=configs/sft_tiny.py",
    f"--config.workdir={workdir}",
    f"--config.num_steps={NUM_STEPS}",
    "--config.checkpoint.every_steps=3",
    "--config.eval.every_steps=4",
    "--config.log.progress=False",
  ]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
  env = dict(os.environ)
  env.update(
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  return env


def _deterministic(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if not k.startswith(PERF_PREFIX)} for r in records]


@pytest.mark.slow  # three short training processes, ~45 s on two cores (mostly XLA compilation)
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, env):
  straight = tmp_path / "straight"
  subprocess.run(_command(straight), cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
  expected = read_metrics(straight)
  assert [r["step"] for r in expected] == list(range(1, NUM_STEPS + 1))

  killed = tmp_path / "killed"
  proc = subprocess.Popen(
    _command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  sigkill_after_step(proc, killed / "metrics.jsonl", 8, timeout=120.0)
  saved = [p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved, "killed before the first checkpoint: the resume would start from scratch"
  partial = read_metrics(killed)
  assert 8 <= partial[-1]["step"] < NUM_STEPS  # really killed mid-run

  resumed = subprocess.run(_command(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr
  got = read_metrics(killed)
  assert [r["step"] for r in got] == list(range(1, NUM_STEPS + 1))
  assert _deterministic(got) == _deterministic(expected)
  assert any("eval_loss" in r for r in got)
  summary = json.loads((killed / "summary.json").read_text())
  assert summary["step"] == NUM_STEPS
