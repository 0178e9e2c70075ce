"""The demo's RL phase (after `configs/demo_sft.py`):

    python -m retool_jax.train --config=configs/demo_rl.py             # runs/demo_cpu/rl
    python -m retool_jax.train --config=configs/demo_rl.py:/tmp/demo   # another run folder

GRPO from the SFT checkpoint on `runs/demo_cpu/data/rl_problems.jsonl`: the bare question as the prompt (no tool
schemas), the sandboxed interpreter running the model's `<code>` calls, reward retool + 0.5 * format.
Settings: `configs/demo_cpu.py`.
"""

import ml_collections

from retool_jax.demo_task.config import DEFAULT_WORKDIR, demo_config, rl_config


def get_config(workdir: str = DEFAULT_WORKDIR) -> ml_collections.ConfigDict:
  return rl_config(demo_config(workdir))
