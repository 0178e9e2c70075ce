"""`make demo`: the ReTool recipe in miniature on the CPU, SFT then RL with a real code interpreter.

    python -m retool_jax.demo [--config=configs/demo_cpu.py] [--config.rl_steps=20]

A from-scratch Qwen3-architecture model learns a task that needs the interpreter (3-digit x 2-digit products):
the data step writes executed tool-use trajectories, then the product's own trainers run SFT
(`configs/demo_sft.py`) and GRPO with sandboxed tool calls (`configs/demo_rl.py`), and `retool_jax.evaluate`
measures held-out accuracy, format correctness and tool-use rate after each phase. Prints the figures and the
commands that reproduce the run by hand, and leaves checkpoints, metrics and plots in the run folder.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from datasets.utils.logging import disable_progress_bar
from ml_collections import config_flags

from retool_jax.demo_task import run_demo
from retool_jax.demo_task.config import demo_config
from retool_jax.sandbox import default_sandbox

_CONFIG = config_flags.DEFINE_config_dict("config", demo_config(), "Demo settings (configs/demo_cpu.py).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  disable_progress_bar()  # the data files are a few hundred KB; the trainers show their own progress
  sandbox = default_sandbox()  # the tool calls' sandbox: say which isolation the model's code runs under
  print(f"sandbox backend: {sandbox.backend_name} ({sandbox.backend_reason})", flush=True)
  results = run_demo(_CONFIG.value)
  print(json.dumps({k: results[k] for k in ("sft", "rl", "timings")}, indent=2))
  print("The same run, step by step:\n  " + "\n  ".join(results["by_hand_commands"]))
  print("Talk to the trained model, then re-evaluate it:\n  " + "\n  ".join(results["next_commands"]))


if __name__ == "__main__":
  app.run(main)
