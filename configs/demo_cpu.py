"""The CPU demo (`make demo`): SFT a tiny from-scratch Qwen3 on executed tool-use trajectories of a synthetic
arithmetic task, then GRPO it with real sandboxed interpreter calls on the embedded engine.

    python -m retool_jax.demo --config=configs/demo_cpu.py [--config.rl_steps=20]

The demo's settings (workdir, seeds, sizes); the phases' own configs derive from them: `configs/demo_sft.py`,
`configs/demo_rl.py` and `configs/eval_demo.py` (see `retool_jax.demo_task.config`).
"""

import ml_collections

from retool_jax.demo_task.config import DEFAULT_WORKDIR, demo_config


def get_config(workdir: str = DEFAULT_WORKDIR) -> ml_collections.ConfigDict:
  return demo_config(workdir)
