"""GRPO / RLOO / GAE advantages and their token plumbing, against values worked out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retool_jax.train import advantages as adv

NAN = float("nan")


def close(a, b, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b, dtype=np.float32), atol=atol, rtol=0)


def test_grpo_normalises_each_group_by_its_unbiased_std():
  rewards = [1, 0, 0, 0, 1, 1, 0, 0]
  # group 1: mean 0.25, deviations (0.75, -0.25 x3), var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5
  # group 2: mean 0.5, deviations +-0.5, var = 4 * 0.25 / 3 = 1/3, std = 0.57735
  s2 = 0.5 / math.sqrt(1 / 3)
  close(adv.grpo_advantages(rewards, 4), [1.5, -0.5, -0.5, -0.5, s2, s2, -s2, -s2])


def test_grpo_mean_only_and_degenerate_groups():
  close(
    adv.grpo_advantages([1, 0, 0, 0, 2, 2, 2, 2], 4, normalize_std=False), [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]
  )
  out = adv.grpo_advantages([3, 3, 3, 3], 4)  # all equal: 0 / (0 + eps)
  close(out, [0, 0, 0, 0])
  close(adv.grpo_advantages([5.0, -2.0], 1), [0, 0])  # one sample per prompt: no baseline to beat


def test_grpo_rejects_batch_that_does_not_split_into_groups():
  with pytest.raises(ValueError, match="group_size=4"):
    adv.grpo_advantages([1, 0, 1, 0, 1, 0], 4)
  with pytest.raises(ValueError, match="1-D"):
    adv.grpo_advantages([[1, 0]], 2)


def test_rloo_subtracts_mean_of_the_other_samples():
  # [1,0,0,0]: 1 - 0 = 1; 0 - 1/3.  [1,1,0,0]: 1 - 1/3 = 2/3; 0 - 2/3.  [3,5]: 3-5, 5-3.
  close(
    adv.rloo_advantages([1, 0, 0, 0, 1, 1, 0, 0], 4), [1, -1 / 3, -1 / 3, -1 / 3, 2 / 3, 2 / 3, -2 / 3, -2 / 3]
  )
  close(adv.rloo_advantages([3, 5], 2), [-2, 2])
  with pytest.raises(ValueError, match="group_size >= 2"):
    adv.rloo_advantages([1, 0], 1)


def test_broadcast_to_tokens_fills_only_policy_tokens():
  mask = [[0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 0]]
  close(adv.broadcast_to_tokens([2.0, -1.0, 7.0], mask), [[0, 2, 2, 0], [-1, 0, -1, -1], [0, 0, 0, 0]])


def test_token_rewards_at_last_policy_token_with_kl_penalty():
  mask = [[0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 0]]
  close(adv.last_token_onehot(mask), [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
  kl = [[0.1, 0.2, 0.3, 0.4], [0.2, NAN, 0.4, 0.2], [1.0, 1.0, 1.0, 1.0]]
  out = adv.token_rewards([1.0, -1.0, 5.0], mask, kl_BT=kl, kl_coef=0.5)
  # row 0: -0.5*0.2 at t1, 1 - 0.5*0.3 at t2; row 1: -0.1, (tool token), -0.2, -1 - 0.1; row 2: nothing to reward
  close(out, [[0, -0.1, 0.85, 0], [-0.1, 0, -0.2, -1.1], [0, 0, 0, 0]])
  close(adv.token_rewards([1.0, -1.0, 5.0], mask), [[0, 0, 1, 0], [0, 0, 0, -1], [0, 0, 0, 0]])


def test_gae_by_hand():
  # gamma 0.9, lambda 0.8 (gamma*lambda = 0.72), values (0.5, 0.6, 0.7), reward 1 at the end:
  # t2: delta = 1 - 0.7 = 0.3                         A2 = 0.3
  # t1: delta = 0.9*0.7 - 0.6 = 0.03                  A1 = 0.03 + 0.72*0.3 = 0.246
  # t0: delta = 0.9*0.6 - 0.5 = 0.04                  A0 = 0.04 + 0.72*0.246 = 0.21712
  a, r = adv.gae([[0.0, 0.0, 1.0]], [[0.5, 0.6, 0.7]], [[1, 1, 1]], gamma=0.9, lam=0.8)
  close(a, [[0.21712, 0.246, 0.3]])
  close(r, [[0.71712, 0.846, 1.0]])
  # gamma = lambda = 1: A_t = (sum of future rewards) - V_t
  a, r = adv.gae([[0.0, 0.0, 1.0]], [[0.5, 0.6, 0.7]], [[1, 1, 1]], gamma=1.0, lam=1.0)
  close(a, [[0.5, 0.4, 0.3]])
  close(r, [[1.0, 1.0, 1.0]])


def test_gae_skips_tool_tokens_and_padding():
  # The same three policy steps as above with a tool-output token at t1 and padding at t4: the result is the
  # same at the policy tokens, garbage outside them (rewards, values, nan) is ignored, and they get 0.
  rewards = [[0.0, 7.0, 0.0, 1.0, 9.0], [1.0, 1.0, 1.0, 1.0, 1.0]]
  values = [[0.5, 99.0, 0.6, 0.7, NAN], [NAN, NAN, NAN, NAN, NAN]]
  mask = [[1, 0, 1, 1, 0], [0, 0, 0, 0, 0]]
  a, r = adv.gae(rewards, values, mask, gamma=0.9, lam=0.8)
  close(a, [[0.21712, 0, 0.246, 0.3, 0], [0, 0, 0, 0, 0]])
  close(r, [[0.71712, 0, 0.846, 1.0, 0], [0, 0, 0, 0, 0]])


def test_gae_with_kl_shaped_rewards():
  # reward 1 at the last token, kl (0.2, 0.4) with coefficient 0.5 -> rewards (-0.1, 0.8); gamma = lambda = 1,
  # values 0: A = (0.7, 0.8)
  rewards = adv.token_rewards([1.0], [[1, 1]], kl_BT=[[0.2, 0.4]], kl_coef=0.5)
  a, _ = adv.gae(rewards, [[0.0, 0.0]], [[1, 1]])
  close(a, [[0.7, 0.8]])


def test_whiten_over_policy_tokens():
  x = [[1.0, 2.0, 3.0, NAN]]
  mask = [[1, 1, 1, 0]]
  # mean 2, population variance 2/3: (x - 2) / sqrt(2/3) = +-1.2247449
  k = 1 / math.sqrt(2 / 3)
  close(adv.whiten(x, mask), [[-k, 0, k, 0]])
  close(adv.whiten(x, mask, shift_mean=False), [[2 - k, 2, 2 + k, 0]])
  close(adv.whiten(x, [[0, 0, 0, 0]]), [[0, 0, 0, 0]])


def test_advantages_jit():
  rewards = jnp.array([1.0, 0.0, 0.5, 0.5, 2.0, 0.0])
  for fn in (adv.grpo_advantages, adv.rloo_advantages):
    close(jax.jit(fn, static_argnums=1)(rewards, 3), fn(rewards, 3))
  mask = jnp.array([[1, 0, 1, 1], [0, 1, 1, 0]])
  r = jnp.array([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 2.0, 0.0]])
  v = jnp.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
  jitted = jax.jit(adv.gae)(r, v, mask, gamma=0.99, lam=0.95)
  eager = adv.gae(r, v, mask, gamma=0.99, lam=0.95)
  close(jitted[0], eager[0])
  close(jitted[1], eager[1])
  close(jax.jit(adv.whiten)(v, mask), adv.whiten(v, mask))
  close(jax.jit(adv.token_rewards)(jnp.array([1.0, 2.0]), mask), adv.token_rewards(jnp.array([1.0, 2.0]), mask))
