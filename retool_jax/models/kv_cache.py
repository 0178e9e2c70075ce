"""Key/value cache for incremental decoding, with a write position per row."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Per-layer keys and values for a batch of sequences, each row with its own write position.

  `k[kind]` / `v[kind]` are `[layers_of_kind, B, S, K, H]` (kind is "dense" or "moe", as the model stacks its
  layers). `valid_BS[b, s]` marks columns that hold a real token (left padding and unwritten columns are
  False). Row b writes its next tokens at columns `index_B[b], index_B[b] + 1, ...`; rows may be at different
  positions (a slot engine), or left-padded so that they end together (a static batch).
  """

  k: dict[str, jax.Array]
  v: dict[str, jax.Array]
  valid_BS: jax.Array
  index_B: jax.Array

  @property
  def max_length(self) -> int:
    return self.valid_BS.shape[1]

  @property
  def batch_size(self) -> int:
    return self.valid_BS.shape[0]

  def num_tokens(self) -> jax.Array:
    """Real tokens held per row, `[B]`."""
    return self.valid_BS.sum(axis=-1)

  def bytes_per_token(self) -> int:
    """Bytes one token of one row takes over all layers (keys and values)."""
    per = sum(a.shape[0] * a.shape[3] * a.shape[4] * a.dtype.itemsize for a in self.k.values())
    return 2 * per


def cache_shapes(
  layer_counts: dict[str, int], batch_size: int, max_length: int, num_kv_heads: int, head_dim: int
) -> dict[str, tuple[int, ...]]:
  return {kind: (n, batch_size, max_length, num_kv_heads, head_dim) for kind, n in layer_counts.items()}


def init_cache(
  layer_counts: dict[str, int], batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype
) -> KVCache:
  shapes = cache_shapes(layer_counts, batch_size, max_length, num_kv_heads, head_dim)
  return KVCache(
    k={kind: jnp.zeros(s, dtype) for kind, s in shapes.items()},
    v={kind: jnp.zeros(s, dtype) for kind, s in shapes.items()},
    valid_BS=jnp.zeros((batch_size, max_length), bool),
    index_B=jnp.zeros((batch_size,), jnp.int32),
  )


def write_rows(cache_BS_: jax.Array, new_BT_: jax.Array, start_B: jax.Array) -> jax.Array:
  """Writes row b's T new entries at columns `start_B[b] + t`; columns past the end are dropped, so a row
  whose start is `S` (or more) writes nothing."""
  b, t = new_BT_.shape[:2]
  cols_BT = start_B[:, None] + jnp.arange(t, dtype=start_B.dtype)[None, :]
  rows_B1 = jnp.arange(b)[:, None]
  return cache_BS_.at[rows_B1, cols_BT].set(new_BT_.astype(cache_BS_.dtype), mode="drop")
