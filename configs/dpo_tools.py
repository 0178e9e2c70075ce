"""DPO on tool-use preference pairs (`{"prompt", "chosen", "rejected"[, "tools"]}` rows), e.g. a correct
interpreter-using solution over a wrong one, from a ReTool SFT checkpoint.

    python -m retool_jax.train --config=configs/dpo_tools.py --config.data.path=pairs.jsonl
"""

import ml_collections

from retool_jax import recipes


def get_config() -> ml_collections.ConfigDict:
  return recipes.tool_dpo("runs/dpo_tools")
