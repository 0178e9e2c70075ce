"""Per-token estimators of KL(pi || ref) from log-probs of tokens sampled from pi.

With `d = ref_logp - logp`: `k1 = -d` (unbiased, high variance, can be negative), `k2 = d^2 / 2` (low variance,
biased), `k3 = exp(d) - d - 1` (unbiased and never negative; the usual choice for a KL loss term).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_estimate(logp_BT: ArrayLike, ref_logp_BT: ArrayLike, estimator: KLEstimator = "k3") -> jax.Array:
  """Elementwise KL estimate of `estimator` (one of `KL_ESTIMATORS`)."""
  d = jnp.asarray(ref_logp_BT, jnp.float32) - jnp.asarray(logp_BT, jnp.float32)
  if estimator == "k1":
    return -d
  if estimator == "k2":
    return 0.5 * jnp.square(d)
  if estimator == "k3":
    return jnp.expm1(d) - d
  raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
