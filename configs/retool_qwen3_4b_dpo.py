"""DPO of the ReTool Qwen3-4B on tool-use preference pairs (`{"prompt", "chosen", "rejected"[, "tools"]}` rows):
a correct interpreter-using solution preferred over a wrong one, starting from the SFT (or RL) checkpoint.

    python -m retool_jax.train --config=configs/retool_qwen3_4b_dpo.py --config.data.path=pairs.jsonl

Targets a TPU v5p-8 (4 chips, mesh fsdp=4): 32 pairs of up to 8192 tokens per update, float32 master weights
and AdamW state sharded over `fsdp`, bfloat16 compute, full remat, splash attention; the reference log-probs
are computed once before training (`reference.precompute`), so no second model stays in memory. Check it with
`python -m retool_jax.aot --config=configs/retool_qwen3_4b_dpo.py --topology=v5p-8`.

The DPO recipe itself (`tool_dpo` in `retool_jax/recipes.py`) is the one `dpo_tools.py` runs at any size.
"""

import ml_collections

from retool_jax import recipes


def get_config() -> ml_collections.ConfigDict:
  c = recipes.tool_dpo("runs/retool_qwen3_4b_dpo")
  recipes.large_model(c.model, "4B")
  c.mesh = recipes.fsdp_mesh()
  c.loss.chunk_size = 1024
  c.checkpoint.every_steps = 100
  return c
