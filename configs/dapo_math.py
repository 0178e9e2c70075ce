"""DAPO on DAPO-Math-17k: clip-higher (0.2 / 0.28), dynamic sampling, token-mean loss, soft overlong punishment,
no KL term; `Answer:`-line rewards as in the DAPO paper.

    python -m retool_jax.train --config=configs/dapo_math.py --config.model.checkpoint=PATH
"""

import ml_collections

from retool_jax import recipes


def get_config() -> ml_collections.ConfigDict:
  c = recipes.rl_default()
  c.workdir = "runs/dapo_math"
  c.num_steps = 500
  c.model.checkpoint = "Qwen3-4B-Base"  # a local Hugging Face folder
  c.model.remat = "full"
  c.data.path = recipes.DAPO_FIXTURE
  c.data.prompt_style = "raw"  # the dataset's own "Answer:" instruction
  c.reward = "math"
  c.tools = "none"  # plain DAPO: no interpreter, so no tool schema in the prompt
  c.rollout = ml_collections.ConfigDict(
    dict(
      max_context=21504,  # prompt (<= 1024) + the response
      max_response_tokens=20480,  # = rl.overlong.max_len: 16k + the 4k overlong buffer
      max_turns=1,
      max_tool_calls=0,
      temperature=1.0,
      call_formats=("code",),
    )
  )
  c.rl = ml_collections.ConfigDict(
    dict(
      algorithm="grpo",
      num_prompts=512 // 16,
      group_size=16,
      num_minibatches=16,
      num_epochs=1,
      loss=dict(clip_low=0.2, clip_high=0.28, aggregation="token_mean", kl_coef=0.0),
      dynamic_sampling=True,
      max_sampling_rounds=3,
      overlong=dict(max_len=20480, cache_len=4096, penalty=1.0),
      logprob_chunk=1024,
      length_multiple=1024,
    )
  )
  c.optim.learning_rate = 1e-6
  c.optim.warmup_steps = 10
  return c
