"""DPO on tool-use preference pairs (`{"prompt", "chosen", "rejected"[, "tools"]}` rows), e.g. a correct
interpreter-using solution over a wrong one, from a ReTool SFT checkpoint.

    python -m retool_jax.train --config=configs/dpo_tools.py --config.data.path=pairs.jsonl
"""

import ml_collections

from retool_jax.train.dpo import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.workdir = "runs/dpo_tools"
  c.model.checkpoint = "runs/retool_qwen3_4b_sft/checkpoints"
  c.data.path = "data/tool_preferences.jsonl"
  c.data.max_length = 8192
  c.batch_size = 32
  c.num_epochs = 1
  c.loss.beta = 0.1
  c.loss.label_smoothing = 0.0
  c.reference.precompute = True
  c.optim.learning_rate = 5e-7
  c.optim.schedule = "warmup_cosine"
  c.optim.warmup_steps = 10
  return c
