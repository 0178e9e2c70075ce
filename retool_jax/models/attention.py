"""Grouped-query attention over a structured mask.

Letters: B batch, T queries, S keys, N query heads, K key/value heads, G = N // K, H head dim.

A query may see a key when both carry the same segment id and the key's column is at or before the query's
own column in the key axis (`s <= q_index[b, t]`). One rule covers every caller:

- training, packed rows: segments are the packing ids, `q_index = arange(T)`;
- training, padded rows: segment 1 for real tokens and 0 for padding on both sides, `q_index = arange(T)`;
- prefill / decode over a KV cache: key segments mark written slots, `q_index` is each query's cache column.

Implementations (`Qwen3Config.attention_impl`):

- `xla`: the reference; materialises the `[B, K, G, T, S]` scores.
- `blockwise`: online softmax over key blocks in plain JAX, O(T x block) memory forward and backward; any mask.
  Over a KV cache (a mask that is not a `SelfAttentionMask`) it is ragged: each row visits only the key blocks
  up to its own last column, so a long row does not slow the others down.
- `splash`: TPU Pallas splash attention for training masks (`mask=None` or from `causal_mask`), else blockwise.
- `cudnn`: GPU cuDNN flash attention for plain causal attention (`mask=None`), else blockwise.
- `auto`: splash on TPU, cudnn on GPU, blockwise elsewhere.

A row that sees no key at all gives 0 under `blockwise` (and the kernels that fall back to it); `xla` gives the
mean of the values there. Masks built by this module never have such rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from retool_jax.models.blockwise_attention import blockwise_attention
from retool_jax.models.qwen3_config import ATTENTION_IMPLS as IMPLS
from retool_jax.models.splash_attention import splash_attention

_NEG_INF = float(jnp.finfo(jnp.float32).min)
BLOCK_SIZE = 512  # query and key block length of the blockwise and splash paths


class AttentionMask(NamedTuple):
  q_segment_BT: jax.Array  # int32 segment id of each query
  kv_segment_BS: jax.Array  # int32 segment id of each key
  q_index_BT: jax.Array  # int32 column of each query in the key axis (causality)

  def dense_BTS(self) -> jax.Array:
    """The boolean `[B, T, S]` mask (the reference; memory-efficient kernels never build it)."""
    s = self.kv_segment_BS.shape[1]
    same = self.q_segment_BT[:, :, None] == self.kv_segment_BS[:, None, :]
    causal = jnp.arange(s)[None, None, :] <= self.q_index_BT[:, :, None]
    return same & causal


class SelfAttentionMask(AttentionMask):
  """An `AttentionMask` known to be square causal self-attention within segments: T == S,
  `q_segment_BT` is `kv_segment_BS` and `q_index_BT` is `arange(T)`. The type survives `jit`, `scan` and
  `checkpoint` (it is the pytree node), so kernels that only take segment ids can rely on it."""

  __slots__ = ()


def causal_mask(
  shape_BT: tuple[int, int], segment_ids_BT: jax.Array | None = None, attention_mask_BT: jax.Array | None = None
) -> AttentionMask:
  """The training mask: causal, within one packed segment, padding apart from real tokens."""
  b, t = shape_BT
  seg = jnp.ones((b, t), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
  if attention_mask_BT is not None:
    seg = jnp.where(attention_mask_BT.astype(bool), seg, 0)
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return SelfAttentionMask(seg, seg, index)


def xla_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask: AttentionMask) -> jax.Array:
  """Reference attention: materialises the float32 `[B, K, G, T, S]` scores."""
  b, t, n, h = q_BTNH.shape
  kv = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / math.sqrt(h))
  logits = jnp.where(mask.dense_BTS()[:, None, None, :, :], logits, _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKH.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH)
  return out.reshape(b, t, n, h)


def platform() -> str:
  """The platform programs are being built for: the current mesh's devices (also when compiling ahead of time
  for another platform under `jax.set_mesh`), else JAX's default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def resolve_impl(impl: str) -> str:
  """`auto` -> the implementation for this platform; other names are checked and returned."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r}; expected one of {IMPLS}")
  if impl != "auto":
    return impl
  return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform(), "blockwise")


def _check_mask(mask: AttentionMask, shape_BT, shape_BS) -> None:
  for name, want in (("q_segment_BT", shape_BT), ("kv_segment_BS", shape_BS), ("q_index_BT", shape_BT)):
    got = tuple(getattr(mask, name).shape)
    if got != tuple(want):
      raise ValueError(f"AttentionMask.{name} has shape {got}; expected {tuple(want)} for these queries and keys")


def attend(
  q_BTNH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  mask: AttentionMask | None,
  *,
  impl: str = "xla",
  block_size: int = BLOCK_SIZE,
) -> jax.Array:
  """Attention output `[B, T, N, H]` by the chosen implementation; `mask=None` is plain causal (T == S).

  `splash` and `cudnn` take the masks they can express and hand the rest to `blockwise`; `block_size` is the
  query and key block length of `blockwise` and `splash` (clipped to the sequence).
  """
  impl = resolve_impl(impl)
  if mask is not None:
    _check_mask(mask, q_BTNH.shape[:2], k_BSKH.shape[:2])
  if impl == "cudnn" and mask is None:
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True, implementation="cudnn")
  if impl == "splash" and (mask is None or isinstance(mask, SelfAttentionMask)):
    segment_ids = None if mask is None else mask.q_segment_BT
    return splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids, block=block_size, interpret=platform() != "tpu")
  if mask is None:
    mask = causal_mask(q_BTNH.shape[:2])
  if impl == "xla":
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, mask)
  # Over a KV cache (prefill and decode: no gradient) each row reads only its own written prefix.
  ragged = not isinstance(mask, SelfAttentionMask)
  return blockwise_attention(q_BTNH, k_BSKH, v_BSKH, *mask, block_q=block_size, block_k=block_size, ragged=ragged)
