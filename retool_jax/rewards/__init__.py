"""Rewards for math answers: extraction, verified equivalence, shaping, and a plug-in registry.

Accuracy is always the verified correctness of the final answer (``RewardResult.correct``); the
training signal (``RewardResult.reward``) may be shaped, but is reported separately.
"""

from retool_jax.rewards.extract import Extraction, extract_answer, last_boxed
from retool_jax.rewards.math_rewards import FormatReward, MathReward, retool_reward
from retool_jax.rewards.normalize import normalize_answer, strictly_equal
from retool_jax.rewards.registry import (
  CombinedReward,
  PluginReward,
  available_rewards,
  combine_rewards,
  get_reward,
  register_reward,
)
from retool_jax.rewards.result import RewardFn, RewardResult, TrajectoryInfo
from retool_jax.rewards.scoring import score_batch, summarize
from retool_jax.rewards.verify import Verdict, Verifier, default_verifier, is_correct, judge

__all__ = [
  "CombinedReward",
  "Extraction",
  "FormatReward",
  "MathReward",
  "PluginReward",
  "RewardFn",
  "RewardResult",
  "TrajectoryInfo",
  "Verdict",
  "Verifier",
  "available_rewards",
  "combine_rewards",
  "default_verifier",
  "extract_answer",
  "get_reward",
  "is_correct",
  "judge",
  "last_boxed",
  "normalize_answer",
  "register_reward",
  "retool_reward",
  "score_batch",
  "strictly_equal",
  "summarize",
]
