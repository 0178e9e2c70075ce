"""ReTool RL on Qwen3-4B (the public recipe): GRPO, lr 1e-6 constant, 32 prompts x 8 samples, clip 0.2 / 0.28,
temperature 1.0, 8192 response tokens over at most 16 turns, strict boxed answers with tool-use shaping.

    python -m retool_jax.train --config=configs/retool_qwen3_4b_rl.py --config.model.checkpoint=runs/retool_sft/...

Targets a TPU v5p-8 (4 chips, mesh fsdp=4): float32 master weights and AdamW state sharded over `fsdp`,
bfloat16 compute, full remat, splash attention. Each of the 4 minibatches of 64 rows x 9216 tokens is one
update accumulated over 2 micro-batches of 32 rows (the same update as one pass). The embedded engine decodes
64 rows at a time (`engine.max_batch_size`, 256 before): its KV cache for 256 rows of 9216 tokens would need
87 GiB per chip next to the train state, more than a v5p chip holds; the 256 trajectories of a step run as
4 engine batches. Check: `python -m retool_jax.aot --config=configs/retool_qwen3_4b_rl.py --topology=v5p-8`.

The recipe itself (`retool_grpo` in `retool_jax/recipes.py`) is shared with the PPO and 30B-A3B configs.
"""

import ml_collections

from retool_jax import recipes


def get_config() -> ml_collections.ConfigDict:
  return recipes.retool_grpo("runs/retool_qwen3_4b_rl", checkpoint=recipes.SFT_4B_CHECKPOINT, preset="4B")
