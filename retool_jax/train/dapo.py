"""DAPO's host-side batch tools: the dynamic-sampling group filter and the soft overlong punishment.

Both run on numpy before a batch is built (the filter changes the batch size, so it cannot be traced).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def informative_groups(rewards_B: ArrayLike, group_size: int, *, atol: float = 0.0) -> np.ndarray:
  """`[B // group_size]` bools: True for prompt groups whose rewards differ, False for all-equal groups.

  An all-equal group has zero advantage under GRPO/RLOO, so dynamic sampling drops it and samples more prompts.
  Rewards within `atol` of the group's first reward count as equal.
  """
  rewards_B = np.asarray(rewards_B, np.float64)
  if rewards_B.ndim != 1 or group_size < 1 or rewards_B.shape[0] % group_size:
    raise ValueError(f"rewards of shape {rewards_B.shape} do not split into groups of group_size={group_size}")
  r_GS = rewards_B.reshape(-1, group_size)
  return np.any(np.abs(r_GS - r_GS[:, :1]) > atol, axis=1)


def overlong_penalty(lengths_B: ArrayLike, max_len: int, cache_len: int, *, penalty: float = 1.0) -> np.ndarray:
  """DAPO's soft overlong punishment, added to the task reward of each response of `lengths_B` tokens.

  0 up to `max_len - cache_len` tokens, then falling linearly to `-penalty` at `max_len`, and `-penalty` beyond.
  """
  if not 0 < cache_len <= max_len:
    raise ValueError(
      f"overlong shaping needs 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}"
    )
  lengths_B = np.asarray(lengths_B, np.float64)
  return penalty * np.clip((max_len - cache_len - lengths_B) / cache_len, -1.0, 0.0)
