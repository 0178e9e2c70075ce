"""Every RL / DPO config passes its trainer's schema, and its sub-configs parse; typos fail by name."""

import importlib.util
from pathlib import Path

import pytest

from retool_jax.rollout import MultiTurnConfig
from retool_jax.train import check_config
from retool_jax.train.rl_config import RLConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("name", ["retool_qwen3_4b_rl", "dapo_math", "grpo_tiny"])
def test_rl_configs_parse(name):
  c = _load(name)
  assert check_config(c).__name__ == "retool_jax.train.rl_run"
  rl = RLConfig.from_config(c.rl)
  MultiTurnConfig.from_config(c.rollout)
  if name == "retool_qwen3_4b_rl":
    assert (rl.num_prompts, rl.group_size, rl.loss.clip_low, rl.loss.clip_high) == (32, 8, 0.2, 0.28)
    assert c.optim.learning_rate == 1e-6 and c.optim.schedule == "constant" and c.rollout.max_turns == 16
    assert (
      c.rollout.temperature == 1.0 and c.rollout.max_response_tokens == 8192 and c.reward == "retool(strict=True)"
    )
    assert c.tools == "interpreter" and rl.algorithm == "grpo" and not rl.loss.kl_coef
  c.rl.clip_hi = 0.3
  with pytest.raises(ValueError, match="clip_hi"):
    RLConfig.from_config(c.rl)


def test_dpo_config_and_typos():
  c = _load("dpo_tools")
  assert check_config(c).__name__ == "retool_jax.train.dpo"
  c.loss.betta = 0.2
  with pytest.raises(ValueError, match="betta"):
    check_config(c)


def test_demo_config_sections_parse():
  c = _load("demo_cpu")
  RLConfig.from_config(c.rl)
  MultiTurnConfig.from_config(c.rollout)
