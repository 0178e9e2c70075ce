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

from retool_jax import recipes


def get_config() -> ml_collections.ConfigDict:
  c = recipes.retool_grpo(
    "runs/retool_qwen3_30b_a3b_rl",
    checkpoint="runs/retool_qwen3_30b_a3b_sft/checkpoints",  # a ReTool SFT of Qwen3-30B-A3B
    preset="30B-A3B",
  )
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1, expert=4))
  c.rl.micro_batch_size = 16  # rows per forward / backward pass (2 per fsdp shard); gradients accumulate
  return c
