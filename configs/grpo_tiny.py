"""A tiny GRPO run for smoke tests: a random 2-layer Qwen3, a few DAPO fixture prompts, real sandboxed tools.

python -m retool_jax.train --config=configs/grpo_tiny.py
"""

import ml_collections

from retool_jax import recipes


def get_config() -> ml_collections.ConfigDict:
  c = recipes.tiny_rl("runs/grpo_tiny")
  c.rl = ml_collections.ConfigDict(
    dict(algorithm="grpo", num_prompts=2, group_size=2, length_multiple=128, loss=dict(kl_coef=0.01))
  )
  return c
