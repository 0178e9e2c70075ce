"""DPO on tool-use preference pairs (`{"prompt", "chosen", "rejected"[, "tools"]}` rows), e.g. a correct
interpreter-using solution over a wrong one, from a ReTool SFT checkpoint.

    python -m retool_jax.train --config=configs/dpo_tools.py --config.data.path=pairs.jsonl
"""

import importlib.util
from pathlib import Path

import ml_collections

_spec = importlib.util.spec_from_file_location("configs_base", Path(__file__).with_name("_base.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)


def get_config() -> ml_collections.ConfigDict:
  return base.tool_dpo("runs/dpo_tools")
