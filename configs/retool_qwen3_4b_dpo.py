"""DPO of the ReTool Qwen3-4B on tool-use preference pairs (`{"prompt", "chosen", "rejected"[, "tools"]}` rows):
a correct interpreter-using solution preferred over a wrong one, starting from the SFT (or RL) checkpoint.

    python -m retool_jax.train --config=configs/retool_qwen3_4b_dpo.py --config.data.path=pairs.jsonl

Targets a TPU v5p-8 (4 chips, mesh fsdp=4): 32 pairs of up to 8192 tokens per update, float32 master weights
and AdamW state sharded over `fsdp`, bfloat16 compute, full remat, splash attention; the reference log-probs
are computed once before training (`reference.precompute`), so no second model stays in memory. Check it with
`python -m retool_jax.aot --config=configs/retool_qwen3_4b_dpo.py --topology=v5p-8`.
"""

import ml_collections

from retool_jax.train.dpo import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.workdir = "runs/retool_qwen3_4b_dpo"
  c.model.checkpoint = "runs/retool_qwen3_4b_sft/checkpoints"  # the ReTool SFT model
  c.model.preset = "4B"  # the checkpoint's architecture: `retool_jax.aot` checks the recipe without it
  c.model.param_dtype = "float32"
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.model.attention_impl = "auto"  # splash attention on TPU, cuDNN on GPU: no [T, S] scores in memory
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  c.data.path = "data/tool_preferences.jsonl"
  c.data.max_length = 8192  # longer pairs are dropped
  c.batch_size = 32
  c.num_epochs = 1
  c.loss.beta = 0.1
  c.loss.label_smoothing = 0.0
  c.loss.chunk_size = 1024
  c.reference.precompute = True
  c.optim.learning_rate = 5e-7
  c.optim.schedule = "warmup_cosine"
  c.optim.warmup_steps = 10
  c.checkpoint.every_steps = 100
  return c
