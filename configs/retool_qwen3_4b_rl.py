"""ReTool RL on Qwen3-4B (the public recipe): GRPO, lr 1e-6 constant, 32 prompts x 8 samples, clip 0.2 / 0.28,
temperature 1.0, 8192 response tokens over at most 16 turns, strict boxed answers with tool-use shaping.

    python -m retool_jax.train --config=configs/retool_qwen3_4b_rl.py --config.model.checkpoint=runs/retool_sft/...
"""

import ml_collections

from retool_jax.train.rl_run import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.workdir = "runs/retool_qwen3_4b_rl"
  c.num_steps = 400
  c.model.checkpoint = "runs/retool_qwen3_4b_sft/checkpoints"  # the ReTool SFT model
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
      algorithm="grpo",
      num_prompts=32,
      group_size=8,
      num_minibatches=4,
      num_epochs=1,
      loss=dict(
        clip_low=0.2, clip_high=0.28, aggregation="token_mean", kl_coef=0.0, entropy_coef=0.0, tis_cap=2.0
      ),
      logprob_chunk=1024,
      micro_batch_size=32,  # rows per forward / backward pass (8 per chip on v5p-8); gradients accumulate
      length_multiple=512,
    )
  )
  c.engine.max_batch_size = 64  # rows decoded together: a 9216-token KV cache for 64 rows is 21 GiB per chip
  c.optim.learning_rate = 1e-6
  c.optim.schedule = "constant"
  c.optim.weight_decay = 0.1
  c.checkpoint.every_steps = 20
  return c
