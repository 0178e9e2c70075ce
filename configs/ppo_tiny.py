"""A tiny PPO run for smoke tests: a random 2-layer Qwen3 policy and critic, a few DAPO fixture prompts, real
sandboxed tools, the KL to the reference folded into the rewards.

python -m retool_jax.train --config=configs/ppo_tiny.py
"""

import ml_collections

from retool_jax import recipes


def get_config() -> ml_collections.ConfigDict:
  c = recipes.tiny_rl("runs/ppo_tiny")
  c.rl = ml_collections.ConfigDict(
    dict(
      algorithm="ppo",
      num_prompts=2,
      group_size=2,
      num_minibatches=2,
      length_multiple=128,
      kl_reward_coef=0.01,
      gamma=1.0,
      lam=0.95,
    )
  )
  c.critic.optim.learning_rate = 1e-3
  return c
