"""A tiny PPO run for smoke tests: a random 2-layer Qwen3 policy and critic, a few DAPO fixture prompts, real
sandboxed tools, the KL to the reference folded into the rewards.

python -m retool_jax.train --config=configs/ppo_tiny.py
"""

import ml_collections

from retool_jax.train.rl_run import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.workdir = "runs/ppo_tiny"
  c.num_steps = 2
  c.model.overrides = ml_collections.ConfigDict(
    dict(
      vocab_size=151936,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=2,
      num_key_value_heads=1,
      head_dim=16,
      tie_word_embeddings=True,
    )
  )
  c.model.dtype = "float32"
  c.data.path = "../shared/fixtures/dapo_math_17k/dapo_math_17k_slime_format.first27.jsonl"
  c.data.limit = 8
  c.rollout = ml_collections.ConfigDict(
    dict(max_context=3072, max_turns=2, max_new_tokens=16, call_formats=("code",))
  )
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
  c.engine.max_batch_size = 8
  c.optim.learning_rate = 1e-4
  c.checkpoint.every_steps = 1
  c.log.tensorboard = False
  return c
