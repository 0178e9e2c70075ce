"""ReTool RL on Qwen3-4B with PPO: the GRPO recipe's rollouts and reward (`retool_qwen3_4b_rl.py`), one sample
per prompt, and a critic (a second Qwen3-4B initialised from the SFT model, with a zero-initialised value head)
that gives per-token GAE advantages over the policy's own tokens; interpreter output is not a time step.

    python -m retool_jax.train --config=configs/retool_qwen3_4b_ppo.py --config.model.checkpoint=runs/retool_sft/...

Targets a TPU v5p-8 (4 chips, mesh fsdp=4), as the GRPO recipe: micro-batches of 16 rows for the policy and
the critic, the engine decoding 64 rows at a time (see `retool_qwen3_4b_rl.py` for why not 256). Policy,
critic (each with float32 AdamW state) and the reference share the chips. Check:
`python -m retool_jax.aot --config=configs/retool_qwen3_4b_ppo.py --topology=v5p-8`.
"""

import ml_collections

from retool_jax import recipes


def get_config() -> ml_collections.ConfigDict:
  # The SFT model starts both the policy and the critic.
  c = recipes.retool_grpo("runs/retool_qwen3_4b_ppo", checkpoint=recipes.SFT_4B_CHECKPOINT, preset="4B")
  c.rl.algorithm = "ppo"
  c.rl.num_prompts = 256  # one sample per prompt: the critic, not the group, is the baseline
  c.rl.group_size = 1
  c.rl.num_minibatches = 4  # policy and critic both take 4 updates per rollout batch
  del c.rl.loss.entropy_coef  # left to the trainer's default (0: no entropy bonus)
  c.rl.kl_reward_coef = 0.001  # k1 KL to the SFT model, subtracted from every policy token's reward
  c.rl.gamma = 1.0  # undiscounted: the reward arrives once, at the end of the answer
  c.rl.lam = 0.95  # GAE trace decay (variance vs. bias of the advantages)
  c.rl.micro_batch_size = 16  # rows per forward / backward pass (4 per chip on v5p-8); gradients accumulate
  c.critic.clip_value = 0.2  # value clipping around the rollout-time values
  c.critic.whiten_advantages = True  # zero mean, unit variance over the batch's policy tokens
  c.critic.head_init_scale = 0.0  # zero-initialised value head: every state starts at value 0
  c.critic.optim.learning_rate = 5e-6  # the critic learns faster than the policy
  c.critic.optim.warmup_steps = 0
  c.critic.optim.weight_decay = 0.0
  return c
