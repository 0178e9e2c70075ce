"""Policy-gradient loss (clip-higher, dual clip, TIS, KL and entropy terms, aggregation), worked out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retool_jax.train.kl import kl_estimate
from retool_jax.train.losses import PolicyLossConfig, aggregate, policy_loss

NAN, INF = float("nan"), float("inf")
E = math.e


def close(a, b, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b, dtype=np.float32), atol=atol, rtol=0)


def from_ratios(ratios, old=-1.0):
  """(logp, old_logp) with exp(logp - old_logp) equal to `ratios`."""
  old_BT = jnp.full((1, len(ratios)), old, jnp.float32)
  return old_BT + jnp.log(jnp.array([ratios], jnp.float32)), old_BT


def loss_and_grad(cfg, logp, old, adv, mask, **kw):
  (loss, metrics), g = jax.value_and_grad(lambda lp: policy_loss(lp, old, adv, mask, cfg, **kw), has_aux=True)(
    logp
  )
  return loss, metrics, g


def test_clip_higher_by_hand():
  # clip range [0.8, 1.28]; per token (loss = max(-A r, -A clip(r)), gradient wrt logp = -A r when unclipped):
  #   A=+1 r=1.1 -> -1.1  (grad -1.1)      A=+1 r=1.5 -> -1.28 clipped (grad 0)
  #   A=-1 r=0.7 ->  0.8 clipped (grad 0)   A=-1 r=0.9 ->  0.9  (grad 0.9)   A=-1 r=0.5 -> 0.8 clipped (grad 0)
  # token mean: (-1.1 - 1.28 + 0.8 + 0.9 + 0.8) / 5 = 0.12 / 5
  logp, old = from_ratios([1.1, 1.5, 0.7, 0.9, 0.5])
  a = jnp.array([[1.0, 1.0, -1.0, -1.0, -1.0]])
  loss, m, g = loss_and_grad(PolicyLossConfig(clip_low=0.2, clip_high=0.28), logp, old, a, jnp.ones((1, 5)))
  close(loss, 0.024)
  close(g, [[-1.1 / 5, 0, 0, 0.9 / 5, 0]])
  close(m["pg_loss"], 0.024)
  close(m["pg_clipfrac"], 3 / 5)
  close(m["ratio_mean"], (1.1 + 1.5 + 0.7 + 0.9 + 0.5) / 5)
  close(m["ratio_max"], 1.5)
  # k3 estimate of KL(old || new) per token: r - 1 - log r
  close(m["approx_kl"], sum(r - 1 - math.log(r) for r in (1.1, 1.5, 0.7, 0.9, 0.5)) / 5)
  assert "pg_clipfrac_dual" not in m and "kl" not in m and "tis_weight_mean" not in m


def test_symmetric_clip_clips_what_clip_higher_lets_through():
  # A=+1, r=1.25: inside [0.8, 1.28] (loss -1.25, grad -1.25), clipped by a symmetric 0.2 (loss -1.2, grad 0)
  logp, old = from_ratios([1.25])
  a, mask = jnp.ones((1, 1)), jnp.ones((1, 1))
  loss, m, g = loss_and_grad(PolicyLossConfig(clip_high=0.28), logp, old, a, mask)
  close(loss, -1.25), close(g, [[-1.25]]), close(m["pg_clipfrac"], 0)
  loss, m, g = loss_and_grad(PolicyLossConfig(clip_high=0.2), logp, old, a, mask)
  close(loss, -1.2), close(g, [[0]]), close(m["pg_clipfrac"], 1)


def test_dual_clip_caps_negative_advantages():
  # A=-1: r=4 -> max(4, 1.28) = 4, capped at c=3 (grad 0); r=2 -> 2 < 3 stays (grad -A r = 2).
  # A=+1, r=0.1: max(-0.1, -0.8) = -0.1, untouched by the cap (grad -0.1).
  logp, old = from_ratios([4.0, 2.0, 0.1])
  a, mask = jnp.array([[-1.0, -1.0, 1.0]]), jnp.ones((1, 3))
  loss, m, g = loss_and_grad(PolicyLossConfig(dual_clip=3.0), logp, old, a, mask)
  close(loss, (3 + 2 - 0.1) / 3)
  close(g, [[0, 2 / 3, -0.1 / 3]])
  close(m["pg_clipfrac_dual"], 1 / 3)
  close(m["pg_clipfrac"], 0)
  loss, _, g = loss_and_grad(PolicyLossConfig(), logp, old, a, mask)
  close(loss, (4 + 2 - 0.1) / 3)
  close(g, [[4 / 3, 2 / 3, -0.1 / 3]])


def test_tis_weights_scale_the_policy_gradient():
  # On-policy (r = 1), A = 1: per-token loss -1, gradient -1. Trainer/rollout probability ratios 0.5, 1.5, 3
  # with cap 2 give weights 0.5, 1.5, 2: loss -(0.5 + 1.5 + 2) / 3, gradient -w / 3.
  old = jnp.full((1, 3), -2.0)
  rollout = old - jnp.log(jnp.array([[0.5, 1.5, 3.0]]))
  a, mask = jnp.ones((1, 3)), jnp.ones((1, 3))
  loss, m, g = loss_and_grad(PolicyLossConfig(tis_cap=2.0), old, old, a, mask, rollout_logp_BT=rollout)
  close(loss, -4 / 3)
  close(g, [[-0.5 / 3, -1.5 / 3, -2 / 3]])
  close(m["tis_weight_mean"], 4 / 3)
  close(m["tis_clipfrac"], 1 / 3)
  close(m["rollout_kl"], sum(r - 1 - math.log(r) for r in (0.5, 1.5, 3.0)) / 3)
  # a huge mismatch saturates at the cap instead of overflowing
  loss, m, g = loss_and_grad(PolicyLossConfig(tis_cap=2.0), old, old, a, mask, rollout_logp_BT=old - 200.0)
  close(loss, -2.0), close(g, [[-2 / 3] * 3]), close(m["tis_clipfrac"], 1)
  # without tis_cap the rollout log-probs only feed the metric
  loss, m, _ = loss_and_grad(PolicyLossConfig(), old, old, a, mask, rollout_logp_BT=rollout)
  close(loss, -1.0)
  assert "rollout_kl" in m and "tis_weight_mean" not in m


def test_kl_estimators_by_hand():
  # d = ref - logp.  d = -1: k1 = 1, k2 = 0.5, k3 = e^-1 + 1 - 1.   d = 1: k1 = -1, k2 = 0.5, k3 = e - 2.
  logp, ref = jnp.array([[-1.0, -2.0]]), jnp.array([[-2.0, -1.0]])
  close(kl_estimate(logp, ref, "k1"), [[1, -1]])
  close(kl_estimate(logp, ref, "k2"), [[0.5, 0.5]])
  close(kl_estimate(logp, ref, "k3"), [[1 / E, E - 2]])
  # gradients wrt logp: k1 -> 1;  k2 -> -(ref - logp) = -d;  k3 -> 1 - e^d
  grad = lambda est: jax.grad(lambda lp: kl_estimate(lp, ref, est).sum())(logp)
  close(grad("k1"), [[1, 1]])
  close(grad("k2"), [[1, -1]])
  close(grad("k3"), [[1 - 1 / E, 1 - E]])
  with pytest.raises(ValueError, match="k4"):
    kl_estimate(logp, ref, "k4")


def test_kl_and_entropy_terms():
  # A = 0 switches the policy-gradient term off; what is left is 0.1 * mean(k3) - 0.01 * mean(H).
  logp, ref, mask = jnp.array([[-1.0, -2.0, 0.0]]), jnp.array([[-2.0, -1.0, 0.0]]), jnp.array([[1, 1, 0]])
  entropy = jnp.array([[1.0, 2.0, NAN]])
  cfg = PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01)
  loss, m, g = loss_and_grad(cfg, logp, logp, jnp.zeros((1, 3)), mask, ref_logp_BT=ref, entropy_BT=entropy)
  k3 = (1 / E + (E - 2)) / 2
  close(loss, 0.1 * k3 - 0.01 * 1.5)
  close(m["kl"], k3), close(m["kl_loss"], k3), close(m["entropy"], 1.5), close(m["pg_loss"], 0)
  close(g, [[0.1 * (1 - 1 / E) / 2, 0.1 * (1 - E) / 2, 0]])
  # the entropy bonus pushes entropy up: d loss / d H = -coef / num_tokens
  g_h = jax.grad(
    lambda h: policy_loss(logp, logp, jnp.zeros((1, 3)), mask, cfg, ref_logp_BT=ref, entropy_BT=h)[0]
  )(entropy)
  close(g_h, [[-0.005, -0.005, 0]])
  # reference given with kl_coef 0: the KL is reported, not optimised
  loss, m, _ = loss_and_grad(PolicyLossConfig(), logp, logp, jnp.zeros((1, 3)), mask, ref_logp_BT=ref)
  close(loss, 0), close(m["kl"], k3)
  assert "kl_loss" not in m


def test_aggregation_modes_by_hand():
  loss = jnp.array([[1.0, 2.0, 3.0, NAN], [4.0, INF, NAN, 5.0], [NAN, NAN, NAN, NAN]])
  mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
  close(aggregate(loss, mask, "token_mean"), (1 + 2 + 3 + 4) / 4)
  close(aggregate(loss, mask, "token_mean", num_tokens=8), 10 / 8)
  close(aggregate(loss, mask, "seq_mean_token_sum"), (6 + 4) / 2)  # the empty row is not a sequence
  close(aggregate(loss, mask, "seq_mean_token_sum", num_seqs=4), 10 / 4)
  close(aggregate(loss, mask, "seq_mean_token_mean"), (2 + 4) / 2)
  with pytest.raises(ValueError, match="token_sum"):
    aggregate(loss, mask, "token_sum")


def random_batch(key, b=6, t=7):
  k = jax.random.split(key, 6)
  old = -jax.random.uniform(k[0], (b, t), minval=0.1, maxval=3.0)
  logp = old + 0.3 * jax.random.normal(k[1], (b, t))
  a = jax.random.normal(k[2], (b, t))
  lengths = jax.random.randint(k[3], (b, 1), 0, t + 1)
  mask = (jnp.arange(t)[None] < lengths).astype(jnp.float32)
  ref = old + 0.2 * jax.random.normal(k[4], (b, t))
  rollout = old + 0.2 * jax.random.normal(k[5], (b, t))
  return logp, old, a, mask, ref, rollout


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_microbatches_with_global_normalisers_sum_to_the_full_batch(aggregation):
  logp, old, a, mask, ref, rollout = random_batch(jax.random.key(0))
  cfg = PolicyLossConfig(aggregation=aggregation, kl_coef=0.05, dual_clip=3.0, tis_cap=2.0)
  num_tokens, num_seqs = mask.sum(), (mask.sum(1) > 0).sum()

  def loss(lp, sl):
    return policy_loss(
      lp[sl],
      old[sl],
      a[sl],
      mask[sl],
      cfg,
      ref_logp_BT=ref[sl],
      rollout_logp_BT=rollout[sl],
      num_tokens=num_tokens,
      num_seqs=num_seqs,
    )[0]

  full, g_full = jax.value_and_grad(loss)(logp, slice(None))
  parts = [jax.value_and_grad(loss)(logp, sl) for sl in (slice(0, 2), slice(2, 6))]
  close(sum(p[0] for p in parts), full)
  close(sum(p[1] for p in parts), g_full)
  # the default normalisers are the batch's own counts
  close(policy_loss(logp, old, a, mask, cfg, ref_logp_BT=ref, rollout_logp_BT=rollout)[0], full)


def test_masked_tokens_contribute_nothing():
  logp, old, a, mask, ref, rollout = random_batch(jax.random.key(1))
  off = mask == 0
  poison = lambda x, v: jnp.where(off, v, x)
  cfg = PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0, tis_cap=2.0)
  entropy = jnp.abs(ref)

  def run(lp, o, adv_, r, e, ro):
    return loss_and_grad(cfg, lp, o, adv_, mask, ref_logp_BT=r, entropy_BT=e, rollout_logp_BT=ro)

  clean = run(logp, old, a, ref, entropy, rollout)
  dirty = run(
    poison(logp, -INF),
    poison(old, NAN),
    poison(a, 1e30),
    poison(ref, INF),
    poison(entropy, NAN),
    poison(rollout, -INF),
  )
  close(dirty[0], clean[0])
  for k in clean[1]:
    close(dirty[1][k], clean[1][k])
  assert np.all(np.isfinite(dirty[2]))
  close(dirty[2], clean[2])
  assert np.all(np.asarray(dirty[2])[np.asarray(off)] == 0)


def test_no_loss_tokens_gives_zero_without_nans():
  logp, old, a, _, ref, rollout = random_batch(jax.random.key(2))
  mask = jnp.zeros_like(logp)
  for aggregation in ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean"):
    cfg = PolicyLossConfig(aggregation=aggregation, kl_coef=0.1, tis_cap=2.0)
    loss, m, g = loss_and_grad(cfg, logp, old, a, mask, ref_logp_BT=ref, rollout_logp_BT=rollout)
    assert float(loss) == 0.0
    assert all(np.isfinite(v) for v in m.values()), m
    assert np.all(np.asarray(g) == 0)


def test_policy_loss_jits_with_static_config():
  logp, old, a, mask, ref, rollout = random_batch(jax.random.key(3))
  cfg = PolicyLossConfig(
    kl_coef=0.1, kl_estimator="k2", dual_clip=3.0, tis_cap=2.0, aggregation="seq_mean_token_mean"
  )
  fn = lambda *xs: policy_loss(*xs[:4], cfg, ref_logp_BT=xs[4], rollout_logp_BT=xs[5])
  jitted, eager = jax.jit(fn)(logp, old, a, mask, ref, rollout), fn(logp, old, a, mask, ref, rollout)
  close(jitted[0], eager[0])
  for k in eager[1]:
    close(jitted[1][k], eager[1][k])
  static = jax.jit(policy_loss, static_argnames="config")
  close(static(logp, old, a, mask, config=cfg, ref_logp_BT=ref, rollout_logp_BT=rollout)[0], eager[0])


@pytest.mark.parametrize(
  "field,value",
  [
    ("clip_low", 1.0),
    ("clip_high", -0.1),
    ("dual_clip", 1.0),
    ("aggregation", "sum"),
    ("kl_estimator", "k4"),
    ("kl_coef", -1.0),
    ("tis_cap", 0.0),
  ],
)
def test_config_rejects_bad_values(field, value):
  with pytest.raises(ValueError, match=f"PolicyLossConfig.{field}"):
    PolicyLossConfig(**{field: value})


def test_missing_inputs_for_enabled_terms():
  x = jnp.zeros((1, 2))
  with pytest.raises(ValueError, match="ref_logp_BT"):
    policy_loss(x, x, x, x, PolicyLossConfig(kl_coef=0.1))
  with pytest.raises(ValueError, match="entropy_BT"):
    policy_loss(x, x, x, x, PolicyLossConfig(entropy_coef=0.1))
  with pytest.raises(ValueError, match="rollout_logp_BT"):
    policy_loss(x, x, x, x, PolicyLossConfig(tis_cap=2.0))
