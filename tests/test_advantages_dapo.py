"""DAPO's dynamic-sampling filter and soft overlong punishment."""

import numpy as np
import pytest

from retool_jax.train.dapo import informative_groups, overlong_penalty


def test_informative_groups_drops_all_equal_groups():
  rewards = [1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0]
  np.testing.assert_array_equal(informative_groups(rewards, 4), [False, True, False])
  np.testing.assert_array_equal(informative_groups([0.5, 0.5000001, 0.2, 0.9], 2, atol=1e-3), [False, True])
  kept = np.repeat(informative_groups(rewards, 4), 4)
  np.testing.assert_array_equal(np.flatnonzero(kept), [4, 5, 6, 7])


def test_informative_groups_rejects_bad_layout():
  with pytest.raises(ValueError, match="group_size=4"):
    informative_groups([1, 0, 1], 4)


def test_overlong_penalty_soft_window():
  # max_len 100, cache 20: free up to 80 tokens, then (80 - L) / 20 down to -1 at 100, -1 beyond.
  out = overlong_penalty([50, 80, 85, 90, 100, 120], max_len=100, cache_len=20)
  np.testing.assert_allclose(out, [0, 0, -0.25, -0.5, -1, -1])
  np.testing.assert_allclose(overlong_penalty([90, 200], 100, 20, penalty=0.5), [-0.25, -0.5])
  np.testing.assert_allclose(overlong_penalty([99, 100, 101], 100, 100), [-0.99, -1, -1])


def test_overlong_penalty_rejects_bad_window():
  with pytest.raises(ValueError, match="cache_len=0"):
    overlong_penalty([10], 100, 0)
  with pytest.raises(ValueError, match="cache_len=200"):
    overlong_penalty([10], 100, 200)
