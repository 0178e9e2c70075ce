"""`make demo`: the ReTool recipe in miniature on the CPU, SFT then RL with a real code interpreter.

    python -m retool_jax.demo [--config=configs/demo_cpu.py] [--config.rl_steps=20]

A from-scratch Qwen3-architecture model learns a task that needs the interpreter (3-digit x 2-digit products):
SFT on executed tool-use trajectories, then GRPO with sandboxed tool calls on the embedded engine. Prints
held-out accuracy, format correctness and tool-use rate after each phase and leaves checkpoints, metrics and
plots in the run folder.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from retool_jax.demo_task import run_demo
from retool_jax.sandbox import default_sandbox

_CONFIG = config_flags.DEFINE_config_file(
  "config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo_cpu.py"), "Demo configuration."
)


def main(_):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  sandbox = default_sandbox()  # the tool calls' sandbox: say which isolation the model's code runs under
  print(f"sandbox backend: {sandbox.backend_name} ({sandbox.backend_reason})", flush=True)
  results = run_demo(_CONFIG.value)
  print(json.dumps(results, indent=2, default=str))
  print("Talk to the trained model, then re-evaluate it:\n  " + "\n  ".join(results["next_commands"]))


if __name__ == "__main__":
  app.run(main)
