"""The CPU demo on the product's own commands: data step, SFT, evaluation, RL, evaluation.

    figures = run_demo(demo_config())

1. The data step (`retool_jax.demo_task.data`): tokenizer, SFT token rows from the teacher's executed
   trajectories, RL problems and held-out problems.
2. SFT of a from-scratch Qwen3 with `retool_jax.train.run(sft_config(demo))`, the function behind
   `python -m retool_jax.train --config=configs/demo_sft.py`.
3. Held-out evaluation of the SFT checkpoint (`retool_jax.evaluate`, as `configs/eval_demo.py:sft`).
4. GRPO from the SFT checkpoint with sandboxed interpreter calls (`configs/demo_rl.py`).
5. Held-out evaluation of the RL checkpoint (`configs/eval_demo.py`).

The run folder holds the tokenizer and data, `sft/` and `rl/` (checkpoints, `metrics.jsonl`, `curves.png`, the
prompt contract), `eval_sft/` and `eval_rl/` (trajectories and summaries) and `results.json` with the figures.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from retool_jax.demo_task.config import (
  DEFAULT_WORKDIR,
  DemoFiles,
  eval_config,
  model_overrides,
  rl_config,
  sft_config,
)
from retool_jax.demo_task.data import prepare
from retool_jax.evaluate import evaluate
from retool_jax.models.qwen3_config import Qwen3Config
from retool_jax.plot import plot_run
from retool_jax.train import run
from retool_jax.train.metrics import read_metrics

PHASES = ("sft", "rl", "eval_sft", "eval_rl")
RL_CURVES = (
  "reward_mean",
  "accuracy",
  "tool_use_rate",
  "format_ok",
  "pg_clipfrac",
  "entropy",
  "grad_norm",
  "response_length",
  "perf/step_time_s",
)


def held_out_figures(summary: dict[str, Any]) -> dict[str, float]:
  """The demo's figures from an evaluation summary: accuracy (avg@n), format, tool use, reward, length."""
  n = summary["samples_per_problem"]
  return {
    "accuracy": summary[f"avg@{n}"],
    "format_ok": summary["answer_format_rate"],
    "tool_use_rate": summary["tool_use_rate"],
    "reward_mean": summary["reward_mean"],
    "response_length": summary["response_tokens_mean"],
  }


def step_times(run_dir: Path) -> dict[str, float]:
  """Mean wall-clock figures (`perf/step_time*`, `time/*`) of a run's steps, the first (compiling) one left out."""
  records = read_metrics(run_dir)
  records = records[1:] or records
  keys = [k for k in records[0] if k.startswith(("time/", "perf/step_time"))] if records else []
  return {k: float(np.mean([r[k] for r in records if k in r])) for k in keys}


def _config(path: str, arg: str = "") -> str:
  return f"--config={path}:{arg}" if arg else f"--config={path}"


def by_hand_commands(workdir: str | Path) -> list[str]:
  """The commands that reproduce a demo run in `workdir` step by step (`configs/*.py:WORKDIR` off the default)."""
  w = Path(workdir).as_posix()
  other = "" if w == DEFAULT_WORKDIR else w
  return [
    "python -m retool_jax.demo_task.data" + (f" --workdir={w}" if other else ""),
    "python -m retool_jax.train " + _config("configs/demo_sft.py", other),
    "python -m retool_jax.evaluate " + _config("configs/eval_demo.py", "sft" + (f",{w}" if other else "")),
    "python -m retool_jax.train " + _config("configs/demo_rl.py", other),
  ]


def next_commands(workdir: str | Path) -> list[str]:
  """The chat and evaluation commands for the checkpoints a demo run left in `workdir`."""
  w = Path(workdir).as_posix()
  return [
    f"python -m retool_jax.chat --checkpoint {w}/rl/checkpoints",
    "python -m retool_jax.evaluate " + _config("configs/eval_demo.py", "" if w == DEFAULT_WORKDIR else f"rl,{w}"),
  ]


def _log(msg: str, t0: float) -> None:
  print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)


def _fmt(ev: dict[str, float]) -> str:
  return (
    f"held-out accuracy {ev['accuracy']:.3f}, format correct {ev['format_ok']:.3f}, "
    f"tool use {ev['tool_use_rate']:.3f}"
  )


def run_demo(demo: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs the whole demo in `demo.workdir`; returns (and writes to `results.json`) the held-out figures after
  each phase (`sft`, `rl`), the data step's figures, the phases' `timings`, the mean `rl_step_time`, and the
  `by_hand_commands` and `next_commands` (chat, evaluate) for the run folder."""
  t0 = time.perf_counter()
  files = DemoFiles(Path(demo.workdir))
  for phase in PHASES:  # a rerun replaces the previous run's results
    shutil.rmtree(files.phase(phase), ignore_errors=True)
  files.workdir.mkdir(parents=True, exist_ok=True)
  timings: dict[str, float] = {}

  def timed(name: str, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    timings[name] = time.perf_counter() - start
    return out

  data = timed("data_s", prepare, demo)
  _log(
    f"data: {data['sft_examples']} executed teacher trajectories (teacher accuracy {data['teacher_accuracy']:.2f},"
    f" tool use {data['teacher_tool_use']:.2f}), {data['rl_problems']} RL and {data['heldout_problems']} "
    "held-out problems",
    t0,
  )
  model = Qwen3Config(**model_overrides(demo))
  _log(
    f"SFT: Qwen3 with {model.num_params() / 1e6:.2f}M parameters from scratch, vocabulary {model.vocab_size}", t0
  )
  sft_cfg = sft_config(demo)
  sft = timed("sft_s", run, sft_cfg)
  _log(f"SFT: {sft_cfg.num_steps} steps, final loss {sft.get('loss', float('nan')):.4f}", t0)
  after_sft = held_out_figures(timed("eval_sft_s", evaluate, eval_config(demo, "sft")))
  _log("after SFT: " + _fmt(after_sft), t0)
  rl = timed("rl_s", run, rl_config(demo))
  _log(f"RL: {demo.rl_steps} steps, reward {rl['reward_mean']:+.3f}, accuracy {rl['accuracy']:.3f}", t0)
  after_rl = held_out_figures(timed("eval_rl_s", evaluate, eval_config(demo, "rl")))
  _log("after RL:  " + _fmt(after_rl), t0)
  timings["total_s"] = time.perf_counter() - t0

  figures = {
    "sft": after_sft,
    "rl": after_rl,
    "data": data,
    "timings": timings,
    "rl_step_time": step_times(files.phase("rl")),
    "by_hand_commands": by_hand_commands(files.workdir),
    "next_commands": next_commands(files.workdir),
  }
  (files.workdir / "results.json").write_text(json.dumps(figures, indent=2) + "\n")
  _plots(files)
  return figures


def _plots(files: DemoFiles) -> None:
  """`curves.png` of both phases."""
  plot_run(files.phase("sft"))
  rl = files.phase("rl")
  logged = {k for r in read_metrics(rl) for k in r}
  plot_run(rl, keys=[k for k in RL_CURVES if k in logged])
