"""PPO value loss, SFT token NLL and DPO, worked out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retool_jax.train.losses import dpo_loss, sequence_logp, sft_loss, value_loss

NAN = float("nan")


def close(a, b, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b, dtype=np.float32), atol=atol, rtol=0)


def log1pexp(x):
  return math.log(1 + math.exp(x))


def test_value_loss_clipping_by_hand():
  # clip 0.2 around the old values (0.8, 1.0, 1.0):
  #   v=1.0, R=1.5: clipped v = 1.0, errors 0.25 / 0.25 -> 0.25, grad (v - R) = -0.5
  #   v=2.0, R=1.5: clipped v = 1.2, errors 0.25 / 0.09 -> 0.25 unclipped, grad 0.5
  #   v=2.0, R=3.0: clipped v = 1.2, errors 1 / 3.24 -> 3.24 clipped, grad 0
  v = jnp.array([[1.0, 2.0, 2.0, NAN]])
  old, ret = jnp.array([[0.8, 1.0, 1.0, NAN]]), jnp.array([[1.5, 1.5, 3.0, NAN]])
  mask = jnp.array([[1, 1, 1, 0]])
  (loss, m), g = jax.value_and_grad(lambda x: value_loss(x, old, ret, mask, clip_value=0.2), has_aux=True)(v)
  close(loss, 0.5 * (0.25 + 0.25 + 3.24) / 3)
  close(g, [[-0.5 / 3, 0.5 / 3, 0, 0]])
  close(m["vf_clipfrac"], 1 / 3)
  close(m["vf_loss"], loss)
  loss, m = value_loss(v, old, ret, mask)
  close(loss, 0.5 * (0.25 + 0.25 + 1.0) / 3)
  close(m["vf_clipfrac"], 0)
  close(value_loss(v, old, ret, mask, clip_value=0.2, num_tokens=6)[0], 0.5 * 3.74 / 6)


def test_value_loss_jits_and_survives_empty_mask():
  v = jnp.ones((2, 3))
  loss, m = jax.jit(value_loss, static_argnames="clip_value")(v, v, v + NAN, jnp.zeros((2, 3)), clip_value=0.2)
  assert float(loss) == 0 and float(m["vf_clipfrac"]) == 0


def test_sft_loss_token_mean_with_explicit_normaliser():
  logp = jnp.array([[-1.0, -2.0, NAN], [-0.5, -float("inf"), NAN]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  (loss, m), g = jax.value_and_grad(lambda x: sft_loss(x, mask), has_aux=True)(logp)
  close(loss, 3.5 / 3)
  close(g, [[-1 / 3, -1 / 3, 0], [-1 / 3, 0, 0]])
  close(m["nll"], 3.5 / 3)
  close(m["tokens"], 3)
  # two microbatches normalised by the global count add up to the full-batch loss
  halves = [sft_loss(logp[i : i + 1], mask[i : i + 1], num_tokens=3)[0] for i in (0, 1)]
  close(halves[0], 3 / 3), close(halves[1], 0.5 / 3), close(sum(halves), loss)
  close(jax.jit(sft_loss)(logp, mask, num_tokens=7.0)[0], 3.5 / 7)
  close(sft_loss(logp, jnp.zeros_like(mask))[0], 0)


def test_sequence_logp_sums_loss_tokens():
  close(
    sequence_logp(jnp.array([[-1.0, -2.0, NAN], [-0.5, 9.0, 9.0]]), jnp.array([[1, 1, 0], [1, 0, 0]])),
    [-3.0, -0.5],
  )


def test_dpo_by_hand():
  # pair 1: chosen reward 0.1 * (-10 + 11) = 0.1, rejected 0.1 * (-12 + 11) = -0.1, z = 0.2 (correctly ranked)
  # pair 2: the same, swapped: z = -0.2
  pc, pr = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
  rc, rr = jnp.array([-11.0, -11.0]), jnp.array([-11.0, -11.0])
  # -log sigmoid(z) = log(1 + e^-z)
  loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
  close(loss, (log1pexp(-0.2) + log1pexp(0.2)) / 2)
  close(m["rewards_chosen"], 0.0), close(m["rewards_rejected"], 0.0)
  close(m["reward_margin"], 0.0), close(m["reward_accuracy"], 0.5)
  # conservative DPO, eps = 0.1, on pair 1 alone: 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2)
  loss, m = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.1, label_smoothing=0.1)
  close(loss, 0.9 * log1pexp(-0.2) + 0.1 * log1pexp(0.2))
  close(m["rewards_chosen"], 0.1), close(m["rewards_rejected"], -0.1)
  close(m["reward_margin"], 0.2), close(m["reward_accuracy"], 1.0)


def test_dpo_gradient_by_hand():
  # d/d pi_c of -(1-eps) log s(z) - eps log s(-z) = beta * (-(1-eps) (1 - s(z)) + eps s(z)); d/d pi_r is the negative
  s = 1 / (1 + math.exp(-0.2))
  g = jax.grad(
    lambda p: dpo_loss(p[:1], p[1:], jnp.array([-11.0]), jnp.array([-11.0]), beta=0.1, label_smoothing=0.1)[0]
  )(jnp.array([-10.0, -12.0]))
  expected = 0.1 * (-0.9 * (1 - s) + 0.1 * s)
  close(g, [expected, -expected])
  # the reference receives no gradient
  g_ref = jax.grad(lambda r: dpo_loss(jnp.array([-10.0]), jnp.array([-12.0]), r, r, beta=0.1)[0])(
    jnp.array([-11.0])
  )
  close(g_ref, [0.0])


def test_dpo_global_normaliser_and_jit():
  pc, pr = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
  r = jnp.array([-11.0, -11.0])
  full = dpo_loss(pc, pr, r, r, beta=0.1)[0]
  halves = [dpo_loss(pc[i : i + 1], pr[i : i + 1], r[:1], r[:1], beta=0.1, num_pairs=2)[0] for i in (0, 1)]
  close(sum(halves), full)
  jitted = jax.jit(dpo_loss, static_argnames=("beta", "label_smoothing"))(pc, pr, r, r, beta=0.1)[0]
  close(jitted, full)
  traced_beta = jax.jit(lambda b: dpo_loss(pc, pr, r, r, beta=b)[0])(0.1)
  close(traced_beta, full)


@pytest.mark.parametrize("kw,match", [({"beta": 0.0}, "beta"), ({"label_smoothing": 0.5}, "label_smoothing")])
def test_dpo_rejects_bad_hyperparameters(kw, match):
  x = jnp.zeros(1)
  with pytest.raises(ValueError, match=match):
    dpo_loss(x, x, x, x, **kw)
