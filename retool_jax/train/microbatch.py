"""Micro-batching: a batch's rows in groups, each group still spread over the mesh's data axes."""

from __future__ import annotations

from typing import Any, Callable

import jax

from retool_jax import sharding as sharding_lib


def split_rows(tree: Any, n: int) -> Any:
  """`[B, ...]` -> `[n, B/n, ...]` taking every n-th row, so each micro-batch stays spread over the mesh."""

  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"a batch of {x.shape[0]} rows does not split into {n} micro-batches")
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(split, tree)


def merge_rows(tree: Any) -> Any:
  """The inverse of `split_rows`; a per-micro-batch scalar (`[n]`) becomes its mean."""
  return jax.tree.map(lambda x: x.mean(0) if x.ndim == 1 else x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), tree)


def constrain_rows(tree: Any) -> Any:
  """Rows over the data axes of the current mesh (a no-op without one)."""
  return jax.tree.map(lambda x: sharding_lib.constrain(x, ("batch",) + (None,) * (x.ndim - 1)), tree)


def map_rows(fn: Callable[[Any], Any], tree: Any, n: int) -> Any:
  """`fn` over `[B, ...]` rows `n` micro-batches at a time (one pass when `n == 1`); outputs are `[B, ...]`."""
  if n == 1:
    return fn(tree)
  return merge_rows(jax.lax.map(lambda mb: fn(constrain_rows(mb)), split_rows(tree, n)))
