"""Masked reductions over `[B, T]` arrays whose mask marks the policy tokens (1) and everything else (0).

Values at masked-out positions are never read: they may be padding garbage (`nan`, `inf`) without reaching a
result or a gradient. A reduction over no tokens gives 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def where_mask(x: ArrayLike, mask: ArrayLike) -> jax.Array:
  """`x` where `mask` is set, 0 elsewhere (so padding `nan`/`inf` neither propagates nor leaks gradient)."""
  x = jnp.asarray(x)
  return jnp.where(jnp.asarray(mask) > 0, x, jnp.zeros((), x.dtype))


def masked_sum(x: ArrayLike, mask: ArrayLike, axis: int | None = None) -> jax.Array:
  return jnp.sum(where_mask(x, mask), axis=axis)


def masked_count(mask: ArrayLike, axis: int | None = None) -> jax.Array:
  return jnp.sum((jnp.asarray(mask) > 0).astype(jnp.float32), axis=axis)


def masked_mean(x: ArrayLike, mask: ArrayLike, axis: int | None = None) -> jax.Array:
  """Mean of `x` over the masked positions; 0 where there are none."""
  return masked_sum(x, mask, axis) / jnp.maximum(masked_count(mask, axis), 1.0)


def masked_var(x: ArrayLike, mask: ArrayLike) -> jax.Array:
  """Population variance of `x` over all masked positions."""
  mean = masked_mean(x, mask)
  return masked_mean(jnp.square(jnp.asarray(x) - mean), mask)


def masked_max(x: ArrayLike, mask: ArrayLike) -> jax.Array:
  """Largest `x` over the masked positions; 0 where there are none."""
  x = jnp.asarray(x)
  on = jnp.asarray(mask) > 0
  return jnp.where(jnp.any(on), jnp.max(jnp.where(on, x, -jnp.inf)), 0.0).astype(x.dtype)
