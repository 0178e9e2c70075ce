"""Trainer losses on `[B, T]` per-token log-probs: clipped policy gradient (PPO/GRPO/DAPO), value, SFT and DPO.

Every loss returns `(loss, metrics)`. Losses summed over tokens take explicit normalisers (`num_tokens`,
`num_seqs`): pass the counts of the whole global batch and *sum* the losses of its microbatches, and gradient
accumulation gives exactly the full-batch result. Left as None, they are the counts of the arrays given.
Metrics are means over the policy tokens of the arrays given. Masked-out positions are never read.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from retool_jax.train.kl import KL_ESTIMATORS, KLEstimator, kl_estimate
from retool_jax.train.masked import masked_count, masked_max, masked_mean, masked_sum, where_mask

Aggregation = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]
AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")
Metrics = dict[str, jax.Array]


def aggregate(
  loss_BT: ArrayLike,
  mask_BT: ArrayLike,
  mode: Aggregation = "token_mean",
  *,
  num_tokens: ArrayLike | None = None,
  num_seqs: ArrayLike | None = None,
) -> jax.Array:
  """Reduces a per-token loss to a scalar.

  `token_mean`: sum over all policy tokens / `num_tokens`. `seq_mean_token_sum`: each sequence's token sum,
  summed / `num_seqs`. `seq_mean_token_mean`: each sequence's token mean, summed / `num_seqs`. By default
  `num_tokens` counts the policy tokens and `num_seqs` the rows holding at least one.
  """
  if mode == "token_mean":
    if num_tokens is None:
      num_tokens = jnp.maximum(masked_count(mask_BT), 1.0)
    return masked_sum(loss_BT, mask_BT) / num_tokens
  if mode not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
  if mode == "seq_mean_token_sum":
    per_seq_B = masked_sum(loss_BT, mask_BT, axis=1)
  else:
    per_seq_B = masked_mean(loss_BT, mask_BT, axis=1)
  if num_seqs is None:
    num_seqs = jnp.maximum(jnp.sum(masked_count(mask_BT, axis=1) > 0), 1).astype(jnp.float32)
  return jnp.sum(per_seq_B) / num_seqs


MIS_LEVELS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """Clipped policy-gradient objective and its extra terms.

  Attributes:
    clip_low: the ratio is clipped below at `1 - clip_low`.
    clip_high: ... and above at `1 + clip_high` (DAPO's clip-higher when larger than `clip_low`).
    dual_clip: with negative advantages, the loss is capped at `-dual_clip * A` (dual-clip PPO; > 1), or None.
    aggregation: how per-token losses become a scalar (`AGGREGATIONS`).
    kl_coef: weight of the KL-to-reference loss term (needs `ref_logp_BT`).
    kl_estimator: `k1`, `k2` or `k3` (see `retool_jax.train.kl`).
    entropy_coef: weight of the entropy bonus (needs `entropy_BT`).
    tis_cap: truncated importance sampling against the rollout engine's log-probs: each token's loss is weighted
      by `min(exp(old_logp - rollout_logp), tis_cap)` (needs `rollout_logp_BT`), or None for no correction.
    mis_low / mis_high: masked importance sampling: tokens whose ratio `exp(old_logp - rollout_logp)` leaves
      `[mis_low, mis_high]` add nothing to the policy-gradient loss (the normaliser is unchanged); None: no
      bound on that side. Both None: no masking.
    mis_level: `token` masks each token by its own ratio; `sequence` masks a whole sequence by the geometric
      mean of its tokens' ratios.
  """

  clip_low: float = 0.2
  clip_high: float = 0.28
  dual_clip: float | None = None
  aggregation: Aggregation = "token_mean"
  kl_coef: float = 0.0
  kl_estimator: KLEstimator = "k3"
  entropy_coef: float = 0.0
  tis_cap: float | None = None
  mis_low: float | None = None
  mis_high: float | None = None
  mis_level: str = "token"

  @property
  def masks_ratios(self) -> bool:
    return self.mis_low is not None or self.mis_high is not None

  def __post_init__(self):
    if not 0.0 <= self.clip_low < 1.0:
      raise ValueError(f"PolicyLossConfig.clip_low must be in [0, 1), got {self.clip_low}")
    if self.clip_high < 0.0:
      raise ValueError(f"PolicyLossConfig.clip_high must be >= 0, got {self.clip_high}")
    if self.dual_clip is not None and self.dual_clip <= 1.0:
      raise ValueError(f"PolicyLossConfig.dual_clip must be > 1 (or None), got {self.dual_clip}")
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"PolicyLossConfig.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f"PolicyLossConfig.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
    if self.kl_coef < 0.0 or self.entropy_coef < 0.0:
      raise ValueError(
        f"PolicyLossConfig.kl_coef and entropy_coef must be >= 0, got {self.kl_coef}, {self.entropy_coef}"
      )
    if self.tis_cap is not None and self.tis_cap <= 0.0:
      raise ValueError(f"PolicyLossConfig.tis_cap must be > 0 (or None), got {self.tis_cap}")
    if self.mis_level not in MIS_LEVELS:
      raise ValueError(f"PolicyLossConfig.mis_level must be one of {MIS_LEVELS}, got {self.mis_level!r}")
    low, high = self.mis_low, self.mis_high
    if (
      (low is not None and low < 0.0)
      or (high is not None and high <= 0.0)
      or (None not in (low, high) and low >= high)
    ):
      raise ValueError(f"PolicyLossConfig.mis_low / mis_high must satisfy 0 <= low < high, got {low}, {high}")


def clipped_pg_loss_BT(
  logp_BT: jax.Array,
  old_logp_BT: jax.Array,
  adv_BT: jax.Array,
  *,
  clip_low: float,
  clip_high: float,
  dual_clip: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Per-token `max(-A r, -A clip(r, 1-clip_low, 1+clip_high))`, capped at `-dual_clip * A` where `A < 0`.

  Returns `(loss_BT, ratio_BT, clipped_BT, dual_clipped_BT)`; the last two are bools marking the tokens whose
  loss came from the clipped ratio (zero gradient) and from the dual-clip cap (zero gradient).
  """
  ratio_BT = jnp.exp(logp_BT - old_logp_BT)
  unclipped_BT = -adv_BT * ratio_BT
  clipped_BT = -adv_BT * jnp.clip(ratio_BT, 1.0 - clip_low, 1.0 + clip_high)
  loss_BT = jnp.maximum(unclipped_BT, clipped_BT)
  is_clipped_BT = clipped_BT > unclipped_BT
  if dual_clip is None:
    return loss_BT, ratio_BT, is_clipped_BT, jnp.zeros_like(is_clipped_BT)
  cap_BT = -adv_BT * dual_clip
  is_dual_BT = (adv_BT < 0) & (loss_BT > cap_BT)
  return jnp.where(is_dual_BT, cap_BT, loss_BT), ratio_BT, is_clipped_BT & ~is_dual_BT, is_dual_BT


def tis_weights(old_logp_BT: ArrayLike, rollout_logp_BT: ArrayLike, cap: float) -> jax.Array:
  """Truncated importance weights `min(pi_old / pi_rollout, cap)` per token, with no gradient."""
  log_w_BT = jnp.asarray(old_logp_BT, jnp.float32) - jnp.asarray(rollout_logp_BT, jnp.float32)
  return jax.lax.stop_gradient(jnp.exp(jnp.minimum(log_w_BT, jnp.log(cap))))


def mis_keep(old_logp_BT: jax.Array, rollout_logp_BT: jax.Array, mask_BT: jax.Array, config: PolicyLossConfig):
  """1 where masked importance sampling keeps a token (its ratio, or its sequence's, is inside the band), else 0."""
  log_r_BT = old_logp_BT - rollout_logp_BT
  if config.mis_level == "sequence":
    m_BT = mask_BT.astype(jnp.float32)
    log_r_B = jnp.sum(log_r_BT * m_BT, axis=1) / jnp.maximum(jnp.sum(m_BT, axis=1), 1.0)
    log_r_BT = jnp.broadcast_to(log_r_B[:, None], log_r_BT.shape)
  keep_BT = jnp.ones(log_r_BT.shape, bool)
  if config.mis_low is not None:
    keep_BT &= log_r_BT >= jnp.log(config.mis_low)
  if config.mis_high is not None:
    keep_BT &= log_r_BT <= jnp.log(config.mis_high)
  return jax.lax.stop_gradient(keep_BT.astype(jnp.float32))


def policy_loss(
  logp_BT: ArrayLike,
  old_logp_BT: ArrayLike,
  adv_BT: ArrayLike,
  mask_BT: ArrayLike,
  config: PolicyLossConfig = PolicyLossConfig(),
  *,
  ref_logp_BT: ArrayLike | None = None,
  entropy_BT: ArrayLike | None = None,
  rollout_logp_BT: ArrayLike | None = None,
  num_tokens: ArrayLike | None = None,
  num_seqs: ArrayLike | None = None,
) -> tuple[jax.Array, Metrics]:
  """Clipped policy-gradient loss `+ kl_coef * KL - entropy_coef * H`, each aggregated by `config.aggregation`.

  `logp_BT` carries the gradient; the old/reference/rollout log-probs and advantages are treated as constants.
  Metrics: `pg_loss`, `pg_clipfrac`, `approx_kl` (k3 estimate of KL(old || current)), `ratio_mean`,
  `ratio_max`; with dual clip `pg_clipfrac_dual`; given `ref_logp_BT`, `kl` (and `kl_loss` when weighted);
  given `entropy_BT`, `entropy`; given `rollout_logp_BT`, `rollout_kl` (k3 estimate of KL(rollout engine ||
  trainer's old policy)), `rollout_ratio_mean` / `rollout_ratio_max` (of `exp(old - rollout)`), with `tis_cap`,
  `tis_weight_mean` and `tis_clipfrac` (tokens at the cap), and with a masked-IS band `mis_masked_frac`.
  """
  c = config
  mask_BT = jnp.asarray(mask_BT)
  logp_BT = where_mask(jnp.asarray(logp_BT, jnp.float32), mask_BT)
  old_logp_BT = jax.lax.stop_gradient(where_mask(jnp.asarray(old_logp_BT, jnp.float32), mask_BT))
  adv_BT = jax.lax.stop_gradient(where_mask(jnp.asarray(adv_BT, jnp.float32), mask_BT))
  agg = lambda x_BT: aggregate(x_BT, mask_BT, c.aggregation, num_tokens=num_tokens, num_seqs=num_seqs)
  mean = lambda x_BT: jax.lax.stop_gradient(masked_mean(x_BT, mask_BT))

  pg_BT, ratio_BT, clipped_BT, dual_BT = clipped_pg_loss_BT(
    logp_BT, old_logp_BT, adv_BT, clip_low=c.clip_low, clip_high=c.clip_high, dual_clip=c.dual_clip
  )
  metrics: Metrics = {
    "pg_clipfrac": mean(clipped_BT),
    "approx_kl": mean(kl_estimate(old_logp_BT, logp_BT, "k3")),
    "ratio_mean": mean(ratio_BT),
    "ratio_max": jax.lax.stop_gradient(masked_max(ratio_BT, mask_BT)),
  }
  if c.dual_clip is not None:
    metrics["pg_clipfrac_dual"] = mean(dual_BT)
  if (c.tis_cap is not None or c.masks_ratios) and rollout_logp_BT is None:
    raise ValueError("PolicyLossConfig.tis_cap or mis_low / mis_high is set but rollout_logp_BT was not given")
  if rollout_logp_BT is not None:
    rollout_logp_BT = jax.lax.stop_gradient(where_mask(jnp.asarray(rollout_logp_BT, jnp.float32), mask_BT))
    metrics["rollout_kl"] = mean(kl_estimate(rollout_logp_BT, old_logp_BT, "k3"))
    if c.masks_ratios:
      rollout_ratio_BT = jnp.exp(old_logp_BT - rollout_logp_BT)
      metrics["rollout_ratio_mean"] = mean(rollout_ratio_BT)
      metrics["rollout_ratio_max"] = jax.lax.stop_gradient(masked_max(rollout_ratio_BT, mask_BT))
  if c.masks_ratios:
    keep_BT = mis_keep(old_logp_BT, rollout_logp_BT, mask_BT, c)
    pg_BT = pg_BT * keep_BT
    metrics["mis_masked_frac"] = mean(1.0 - keep_BT)
  if c.tis_cap is not None:
    w_BT = tis_weights(old_logp_BT, rollout_logp_BT, c.tis_cap)
    pg_BT = pg_BT * w_BT
    metrics["tis_weight_mean"] = mean(w_BT)
    metrics["tis_clipfrac"] = mean(old_logp_BT - rollout_logp_BT >= jnp.log(c.tis_cap))
  loss = agg(pg_BT)
  metrics["pg_loss"] = jax.lax.stop_gradient(loss)

  if c.kl_coef > 0.0 and ref_logp_BT is None:
    raise ValueError("PolicyLossConfig.kl_coef > 0 but ref_logp_BT was not given")
  if ref_logp_BT is not None:
    ref_logp_BT = jax.lax.stop_gradient(where_mask(jnp.asarray(ref_logp_BT, jnp.float32), mask_BT))
    kl_BT = kl_estimate(logp_BT, ref_logp_BT, c.kl_estimator)
    metrics["kl"] = mean(kl_BT)
    if c.kl_coef > 0.0:
      kl_loss = agg(kl_BT)
      metrics["kl_loss"] = jax.lax.stop_gradient(kl_loss)
      loss = loss + c.kl_coef * kl_loss

  if c.entropy_coef > 0.0 and entropy_BT is None:
    raise ValueError("PolicyLossConfig.entropy_coef > 0 but entropy_BT was not given")
  if entropy_BT is not None:
    entropy_BT = where_mask(jnp.asarray(entropy_BT, jnp.float32), mask_BT)
    metrics["entropy"] = mean(entropy_BT)
    if c.entropy_coef > 0.0:
      loss = loss - c.entropy_coef * agg(entropy_BT)
  return loss, metrics


def value_loss(
  values_BT: ArrayLike,
  old_values_BT: ArrayLike,
  returns_BT: ArrayLike,
  mask_BT: ArrayLike,
  *,
  clip_value: float | None = None,
  num_tokens: ArrayLike | None = None,
) -> tuple[jax.Array, Metrics]:
  """PPO value loss `0.5 * max((v - R)^2, (v_clipped - R)^2)`, token mean over the policy tokens.

  `v_clipped = v_old + clip(v - v_old, -clip_value, clip_value)`; with `clip_value=None` it is plain
  `0.5 * (v - R)^2`. Metrics: `vf_loss`, `vf_clipfrac` (tokens whose clipped error was the larger).
  """
  mask_BT = jnp.asarray(mask_BT)
  v_BT = where_mask(jnp.asarray(values_BT, jnp.float32), mask_BT)
  ret_BT = jax.lax.stop_gradient(where_mask(jnp.asarray(returns_BT, jnp.float32), mask_BT))
  err_BT = jnp.square(v_BT - ret_BT)
  clipped_BT = jnp.zeros(err_BT.shape, bool)
  if clip_value is not None:
    old_BT = jax.lax.stop_gradient(where_mask(jnp.asarray(old_values_BT, jnp.float32), mask_BT))
    err_clip_BT = jnp.square(old_BT + jnp.clip(v_BT - old_BT, -clip_value, clip_value) - ret_BT)
    clipped_BT = err_clip_BT > err_BT
    err_BT = jnp.maximum(err_BT, err_clip_BT)
  loss = aggregate(0.5 * err_BT, mask_BT, "token_mean", num_tokens=num_tokens)
  return loss, {"vf_loss": jax.lax.stop_gradient(loss), "vf_clipfrac": masked_mean(clipped_BT, mask_BT)}


def sft_loss(
  logp_BT: ArrayLike, mask_BT: ArrayLike, *, num_tokens: ArrayLike | None = None
) -> tuple[jax.Array, Metrics]:
  """Negative log-likelihood summed over the loss tokens / `num_tokens`. Metrics: `nll` (local mean), `tokens`."""
  nll_BT = -jnp.asarray(logp_BT, jnp.float32)
  loss = aggregate(nll_BT, mask_BT, "token_mean", num_tokens=num_tokens)
  metrics = {"nll": jax.lax.stop_gradient(masked_mean(nll_BT, mask_BT)), "tokens": masked_count(mask_BT)}
  return loss, metrics


def sequence_logp(logp_BT: ArrayLike, mask_BT: ArrayLike) -> jax.Array:
  """Log-probability of each sequence: the sum of its loss tokens' log-probs, `[B]`."""
  return masked_sum(logp_BT, mask_BT, axis=1)


def dpo_loss(
  policy_chosen_B: ArrayLike,
  policy_rejected_B: ArrayLike,
  ref_chosen_B: ArrayLike,
  ref_rejected_B: ArrayLike,
  *,
  beta: float = 0.1,
  label_smoothing: float = 0.0,
  num_pairs: ArrayLike | None = None,
) -> tuple[jax.Array, Metrics]:
  """Sigmoid DPO loss from sequence log-probs, with conservative label smoothing `eps`.

  With `z = beta * ((pi_c - ref_c) - (pi_r - ref_r))`, each pair costs
  `-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`; the sum is divided by `num_pairs` (default: the pairs given).
  Metrics: `rewards_chosen`, `rewards_rejected` (mean `beta * (pi - ref)`), `reward_margin`, `reward_accuracy`.
  """
  if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
  if isinstance(beta, (int, float)) and beta <= 0.0:
    raise ValueError(f"dpo beta must be > 0, got {beta}")
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  chosen_B = beta * (f32(policy_chosen_B) - jax.lax.stop_gradient(f32(ref_chosen_B)))
  rejected_B = beta * (f32(policy_rejected_B) - jax.lax.stop_gradient(f32(ref_rejected_B)))
  z_B = chosen_B - rejected_B
  per_pair_B = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z_B) - label_smoothing * jax.nn.log_sigmoid(-z_B)
  if num_pairs is None:
    num_pairs = per_pair_B.shape[0]
  loss = jnp.sum(per_pair_B) / num_pairs
  sg = jax.lax.stop_gradient
  metrics = {
    "rewards_chosen": sg(jnp.mean(chosen_B)),
    "rewards_rejected": sg(jnp.mean(rejected_B)),
    "reward_margin": sg(jnp.mean(z_B)),
    "reward_accuracy": jnp.mean((chosen_B > rejected_B).astype(jnp.float32)),
  }
  return loss, metrics
