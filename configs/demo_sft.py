"""The demo's SFT phase (run `python -m retool_jax.demo_task.data` first, or `make demo`):

    python -m retool_jax.train --config=configs/demo_sft.py            # runs/demo_cpu/sft
    python -m retool_jax.train --config=configs/demo_sft.py:/tmp/demo  # another run folder

A from-scratch Qwen3 (the demo's architecture, the vocabulary of its tokenizer) trained on the teacher's executed
trajectories, `runs/demo_cpu/data/sft_tokens.jsonl` in the `tokens` format. Settings: `configs/demo_cpu.py`.
"""

import ml_collections

from retool_jax.demo_task.config import DEFAULT_WORKDIR, demo_config, sft_config


def get_config(workdir: str = DEFAULT_WORKDIR) -> ml_collections.ConfigDict:
  return sft_config(demo_config(workdir))
