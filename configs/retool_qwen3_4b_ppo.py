"""ReTool RL on Qwen3-4B with PPO: the GRPO recipe's rollouts and reward (`retool_qwen3_4b_rl.py`), one sample
per prompt, and a critic (a second Qwen3-4B initialised from the SFT model, with a zero-initialised value head)
that gives per-token GAE advantages over the policy's own tokens; interpreter output is not a time step.

    python -m retool_jax.train --config=configs/retool_qwen3_4b_ppo.py --config.model.checkpoint=runs/retool_sft/...
"""

import ml_collections

from retool_jax.train.rl_run import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.workdir = "runs/retool_qwen3_4b_ppo"
  c.num_steps = 400
  c.model.checkpoint = "runs/retool_qwen3_4b_sft/checkpoints"  # the ReTool SFT model: policy and critic
  c.model.remat = "full"
  c.model.preset = "4B"  # the checkpoint's architecture: `retool_jax.aot` checks the recipe without it
  c.model.attention_impl = "auto"  # splash attention on TPU, cuDNN on GPU: no [T, S] scores in memory
  c.model.scan_layers = True  # one decoder layer compiled, scanned over the stack
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  c.data.path = (
    "../shared/fixtures/dapo_math_17k/dapo_math_17k_slime_format.first27.jsonl"  # the full set in a run
  )
  c.data.prompt_style = "retool"
  c.reward = "retool"  # <answer>\boxed{}</answer>; wrong after k calls: min(-0.6, -1 + 0.1 k)
  c.rollout = ml_collections.ConfigDict(
    dict(
      max_context=9216,  # prompt (<= 1024) + the response
      max_response_tokens=8192,  # every turn and interpreter output after the prompt
      max_turns=16,
      max_tool_calls=16,
      max_observation_tokens=1024,
      temperature=1.0,
      top_p=1.0,
      call_formats=("code",),
    )
  )
  c.rl = ml_collections.ConfigDict(
    dict(
      algorithm="ppo",
      num_prompts=256,  # one sample per prompt: the critic, not the group, is the baseline
      group_size=1,
      num_minibatches=4,  # policy and critic both take 4 updates per rollout batch
      num_epochs=1,
      loss=dict(clip_low=0.2, clip_high=0.28, aggregation="token_mean", kl_coef=0.0, tis_cap=2.0),
      kl_reward_coef=0.001,  # k1 KL to the SFT model, subtracted from every policy token's reward
      gamma=1.0,  # undiscounted: the reward arrives once, at the end of the answer
      lam=0.95,  # GAE trace decay (variance vs. bias of the advantages)
      logprob_chunk=1024,
      micro_batch_size=32,  # rows per forward / backward pass (8 per chip on v5p-8); gradients accumulate
      length_multiple=512,
    )
  )
  c.engine.max_batch_size = 64  # rows decoded together: a 9216-token KV cache for 64 rows is 21 GiB per chip
  c.optim.learning_rate = 1e-6
  c.optim.schedule = "constant"
  c.optim.weight_decay = 0.1
  c.critic.clip_value = 0.2  # value clipping around the rollout-time values
  c.critic.whiten_advantages = True  # zero mean, unit variance over the batch's policy tokens
  c.critic.head_init_scale = 0.0  # zero-initialised value head: every state starts at value 0
  c.critic.optim.learning_rate = 5e-6  # the critic learns faster than the policy
  c.critic.optim.warmup_steps = 0
  c.critic.optim.weight_decay = 0.0
  c.checkpoint.every_steps = 20
  return c
