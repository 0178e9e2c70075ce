"""A tiny GRPO run for smoke tests: a random 2-layer Qwen3, a few DAPO fixture prompts, real sandboxed tools.

python -m retool_jax.train --config=configs/grpo_tiny.py
"""

import importlib.util
from pathlib import Path

import ml_collections

_spec = importlib.util.spec_from_file_location("configs_base", Path(__file__).with_name("_base.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)


def get_config() -> ml_collections.ConfigDict:
  c = base.tiny_rl("runs/grpo_tiny")
  c.rl = ml_collections.ConfigDict(
    dict(algorithm="grpo", num_prompts=2, group_size=2, length_multiple=128, loss=dict(kl_coef=0.01))
  )
  return c
