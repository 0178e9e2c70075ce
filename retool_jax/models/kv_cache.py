"""Key/value cache for incremental decoding."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Per-layer keys and values for a batch of sequences sharing one write pointer.

  `k[kind]` / `v[kind]` are `[layers_of_kind, B, S, K, H]` (kind is "dense" or "moe", as the model stacks its
  layers). `valid[b, s]` marks slots that hold a real token (left padding and unwritten slots are False).
  All rows write at slot `index`; ragged prompts are left-padded so they end together.
  """

  k: dict[str, jax.Array]
  v: dict[str, jax.Array]
  valid_BS: jax.Array
  index: jax.Array

  @property
  def max_length(self) -> int:
    return self.valid_BS.shape[1]

  @property
  def batch_size(self) -> int:
    return self.valid_BS.shape[0]

  def num_tokens(self) -> jax.Array:
    """Real tokens held per row, `[B]`."""
    return self.valid_BS.sum(axis=-1)


def init_cache(
  layer_counts: dict[str, int], batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype
) -> KVCache:
  shape = lambda n: (n, batch_size, max_length, num_kv_heads, head_dim)
  return KVCache(
    k={kind: jnp.zeros(shape(n), dtype) for kind, n in layer_counts.items()},
    v={kind: jnp.zeros(shape(n), dtype) for kind, n in layer_counts.items()},
    valid_BS=jnp.zeros((batch_size, max_length), bool),
    index=jnp.zeros((), jnp.int32),
  )
