"""ReTool RL (GRPO) on Qwen3-30B-A3B, the mixture-of-experts model (128 experts, 8 active, 3B active parameters),
with the 4B recipe's rollouts and reward (`retool_qwen3_4b_rl.py`): 32 prompts x 8 samples, 9216-token context.

    python -m retool_jax.train --config=configs/retool_qwen3_30b_a3b_rl.py --config.model.checkpoint=/ckpt/...

Targets a TPU v5p-64 (32 chips) with an expert-parallel mesh: `expert=4` splits the experts (each chip holds 32
of them), `fsdp=8` shards every weight's model width and the batch rows. Float32 master weights and AdamW state
(about 370 GB in all, 12 GB per chip), bfloat16 compute, full remat, splash attention, 16-row micro-batches;
the embedded engine decodes 64 rows at a time. Check it with
`python -m retool_jax.aot --config=configs/retool_qwen3_30b_a3b_rl.py --topology=v5p-64`.
"""

import ml_collections

from retool_jax.train.rl_run import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.workdir = "runs/retool_qwen3_30b_a3b_rl"
  c.num_steps = 400
  c.model.checkpoint = "runs/retool_qwen3_30b_a3b_sft/checkpoints"  # a ReTool SFT of Qwen3-30B-A3B
  c.model.preset = "30B-A3B"  # the checkpoint's architecture: `retool_jax.aot` checks the recipe without it
  c.model.remat = "full"
  c.model.attention_impl = "auto"  # splash attention on TPU, cuDNN on GPU: no [T, S] scores in memory
  c.model.scan_layers = True  # one decoder layer compiled, scanned over the stack
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1, expert=4))
  c.data.path = (
    "../shared/fixtures/dapo_math_17k/dapo_math_17k_slime_format.first27.jsonl"  # the full set in a run
  )
  c.data.prompt_style = "retool"
  c.reward = "retool"
  c.rollout = ml_collections.ConfigDict(
    dict(
      max_context=9216,  # prompt (<= 1024) + the response
      max_response_tokens=8192,
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
      micro_batch_size=16,  # rows per forward / backward pass (2 per fsdp shard); gradients accumulate
      length_multiple=512,
    )
  )
  c.engine.max_batch_size = 64
  c.optim.learning_rate = 1e-6
  c.optim.schedule = "constant"
  c.optim.weight_decay = 0.1
  c.checkpoint.every_steps = 20
  return c
