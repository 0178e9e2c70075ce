"""Advantage estimators: GRPO and RLOO over prompt groups, GAE for PPO, and their token-level plumbing.

Group layouts are contiguous: with `group_size = G`, samples `[g*G, (g+1)*G)` answer prompt `g`. All functions
are pure and jit-able (`group_size` static); masked-out tokens read nothing and receive 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from retool_jax.train.masked import masked_mean, masked_var, where_mask


def _groups(rewards_B: ArrayLike, group_size: int) -> jax.Array:
  rewards_B = jnp.asarray(rewards_B, jnp.float32)
  if rewards_B.ndim != 1:
    raise ValueError(f"rewards must be 1-D [B], got shape {rewards_B.shape}")
  if group_size < 1 or rewards_B.shape[0] % group_size:
    raise ValueError(
      f"batch of {rewards_B.shape[0]} rewards does not split into groups of group_size={group_size}"
    )
  return rewards_B.reshape(-1, group_size)


def grpo_advantages(
  rewards_B: ArrayLike, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6
) -> jax.Array:
  """GRPO: `(r - mean_group) / (std_group + eps)`, or `r - mean_group` with `normalize_std=False` (Dr. GRPO).

  The standard deviation is the unbiased (n-1) one; a group of one sample gets advantage 0.
  """
  r_GS = _groups(rewards_B, group_size)
  centred_GS = r_GS - jnp.mean(r_GS, axis=1, keepdims=True)
  if normalize_std and group_size > 1:
    std_G1 = jnp.sqrt(jnp.sum(jnp.square(centred_GS), axis=1, keepdims=True) / (group_size - 1))
    centred_GS = centred_GS / (std_G1 + eps)
  return centred_GS.reshape(-1)


def rloo_advantages(rewards_B: ArrayLike, group_size: int) -> jax.Array:
  """RLOO: each sample's reward minus the mean reward of the other `group_size - 1` samples of its prompt."""
  if group_size < 2:
    raise ValueError(f"RLOO needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
  r_GS = _groups(rewards_B, group_size)
  others_GS = (jnp.sum(r_GS, axis=1, keepdims=True) - r_GS) / (group_size - 1)
  return (r_GS - others_GS).reshape(-1)


def broadcast_to_tokens(adv_B: ArrayLike, mask_BT: ArrayLike) -> jax.Array:
  """Gives every policy token of a sequence that sequence's advantage; other tokens get 0."""
  adv_B = jnp.asarray(adv_B, jnp.float32)
  mask_BT = jnp.asarray(mask_BT)
  return where_mask(jnp.broadcast_to(adv_B[:, None], mask_BT.shape), mask_BT)


def last_token_onehot(mask_BT: ArrayLike) -> jax.Array:
  """1.0 at each row's last policy token, 0 elsewhere (an all-zero row stays all zero)."""
  on_BT = jnp.asarray(mask_BT) > 0
  t = on_BT.shape[1]
  last_B = t - 1 - jnp.argmax(on_BT[:, ::-1], axis=1)
  onehot_BT = jax.nn.one_hot(last_B, t, dtype=jnp.float32)
  return onehot_BT * jnp.any(on_BT, axis=1, keepdims=True)


def token_rewards(
  seq_rewards_B: ArrayLike, mask_BT: ArrayLike, *, kl_BT: ArrayLike | None = None, kl_coef: float = 0.0
) -> jax.Array:
  """Token-level rewards for PPO: the sequence reward at the last policy token, plus `-kl_coef * kl` per token."""
  rewards_BT = last_token_onehot(mask_BT) * jnp.asarray(seq_rewards_B, jnp.float32)[:, None]
  if kl_BT is not None:
    rewards_BT = rewards_BT - kl_coef * where_mask(kl_BT, mask_BT)
  return rewards_BT


def gae(
  rewards_BT: ArrayLike, values_BT: ArrayLike, mask_BT: ArrayLike, *, gamma: float = 1.0, lam: float = 1.0
) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation over the policy tokens; returns `(advantages_BT, returns_BT)`.

  Only policy tokens are time steps: tokens outside the mask (prompt, tool output, padding) are skipped, so the
  step after a policy token is the next policy token, and the episode ends after the last one (value 0).
  Rewards on masked-out tokens are ignored. `returns = advantages + values` on policy tokens.
  """
  on_BT = jnp.asarray(mask_BT) > 0
  r_TB = where_mask(jnp.asarray(rewards_BT, jnp.float32), on_BT).T
  v_TB = where_mask(jnp.asarray(values_BT, jnp.float32), on_BT).T

  def step(carry, xs):
    next_value_B, next_adv_B = carry
    r_B, v_B, on_B = xs
    adv_B = r_B + gamma * next_value_B - v_B + gamma * lam * next_adv_B
    carry = (jnp.where(on_B, v_B, next_value_B), jnp.where(on_B, adv_B, next_adv_B))
    return carry, jnp.where(on_B, adv_B, 0.0)

  zeros_B = jnp.zeros(r_TB.shape[1], jnp.float32)
  _, adv_TB = jax.lax.scan(step, (zeros_B, zeros_B), (r_TB, v_TB, on_BT.T), reverse=True)
  adv_BT = adv_TB.T
  return adv_BT, jnp.where(on_BT, adv_BT + v_TB.T, 0.0)


def whiten(x_BT: ArrayLike, mask_BT: ArrayLike, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
  """Scales `x` to unit (population) variance over the policy tokens, and to zero mean unless `shift_mean=False`."""
  x_BT = jnp.asarray(x_BT, jnp.float32)
  mean = masked_mean(x_BT, mask_BT)
  out_BT = (x_BT - mean) * jax.lax.rsqrt(masked_var(x_BT, mask_BT) + eps)
  if not shift_mean:
    out_BT = out_BT + mean
  return where_mask(out_BT, mask_BT)
