"""Blockwise (flash-style) attention in plain JAX: online softmax over key blocks, custom VJP.

Letters as in `attention.py`; Q and C are query and key block lengths, I and J count query and key blocks.

Memory is O(T x C) per head in the forward and the backward pass: the backward recomputes each block's
probabilities from the saved log-sum-exp instead of keeping the `[T, S]` matrix. Key blocks past the last
column any query may see are never visited (a decode step over a long cache reads only its written prefix), and
each query block stops at the last key block its own queries reach. Rows that see no key give 0.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_NEG = float(jnp.finfo(jnp.float32).min)


def _ceil_div(a, b):
  return -(-a // b)


def _pad_axis(x: jax.Array, axis: int, size: int, value) -> jax.Array:
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def blockwise_attention(
  q_BTNH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  q_segment_BT: jax.Array,
  kv_segment_BS: jax.Array,
  q_index_BT: jax.Array,
  *,
  block_q: int = 512,
  block_k: int = 512,
) -> jax.Array:
  """Attention output `[B, T, N, H]` under the segment / key-column rule of `AttentionMask`.

  Block lengths are clipped to T and S; both axes are padded to a whole number of blocks.
  """
  b, t, n, h = q_BTNH.shape
  s, kv = k_BSKH.shape[1], k_BSKH.shape[2]
  if n % kv:
    raise ValueError(f"query heads ({n}) must be a multiple of key/value heads ({kv})")
  if block_q < 1 or block_k < 1:
    raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
  bq, bk = min(block_q, t), min(block_k, s)
  tp, sp = _ceil_div(t, bq) * bq, _ceil_div(s, bk) * bk
  q = _pad_axis(q_BTNH, 1, tp, 0).reshape(b, tp, kv, n // kv, h)
  k, v = _pad_axis(k_BSKH, 1, sp, 0), _pad_axis(v_BSKH, 1, sp, 0)
  # Padded queries see nothing (segment -2, column -1); padded keys belong to no segment (-1).
  q_seg = _pad_axis(q_segment_BT.astype(jnp.int32), 1, tp, -2)
  q_idx = _pad_axis(q_index_BT.astype(jnp.int32), 1, tp, -1)
  kv_seg = _pad_axis(kv_segment_BS.astype(jnp.int32), 1, sp, -1)
  out = _flash(bq, bk, q, k, v, q_seg, kv_seg, q_idx)
  return out[:, :t].reshape(b, t, n, h)


def _block_mask(q_seg_BQ, q_idx_BQ, kv_seg_BC, j, bk):
  col = j * bk + jnp.arange(bk, dtype=jnp.int32)
  same = q_seg_BQ[:, :, None] == kv_seg_BC[:, None, :]
  return (same & (col[None, None, :] <= q_idx_BQ[:, :, None]))[:, None, None]  # [B, 1, 1, Q, C]


def _scores(q_BQKGH, k_BCKH, scale):
  return jnp.einsum("bqkgh,bckh->bkgqc", q_BQKGH, k_BCKH, preferred_element_type=jnp.float32) * scale


def _live_key_blocks(q_idx_BQ, bk: int, num_k_blocks: int):
  """How many key blocks (from the first) these queries may see: those up to the largest column."""
  return jnp.clip((jnp.max(q_idx_BQ) + bk) // bk, 0, num_k_blocks)


def _forward(bq, bk, q, k, v, q_seg, kv_seg, q_idx):
  """Returns the output `[B, Tp, K, G, H]` and the float32 log-sum-exp `[B, K, G, Tp]`."""
  b, tp, kv, g, h = q.shape
  nq, nk = tp // bq, k.shape[1] // bk
  scale = 1.0 / math.sqrt(h)

  def query_block(_, i):
    q_i = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
    seg_i = jax.lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1)
    idx_i = jax.lax.dynamic_slice_in_dim(q_idx, i * bq, bq, axis=1)

    def key_block(j, carry):
      m, l, acc = carry
      k_j = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
      v_j = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
      seen = _block_mask(seg_i, idx_i, jax.lax.dynamic_slice_in_dim(kv_seg, j * bk, bk, axis=1), j, bk)
      s_ = _scores(q_i, k_j, scale)
      m_new = jnp.maximum(m, jnp.max(jnp.where(seen, s_, _NEG), axis=-1))
      p = jnp.where(seen, jnp.exp(s_ - m_new[..., None]), 0.0)
      alpha = jnp.exp(m - m_new)
      pv = jnp.einsum("bkgqc,bckh->bkgqh", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
      return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    init = (
      jnp.full((b, kv, g, bq), _NEG, jnp.float32),
      jnp.zeros((b, kv, g, bq), jnp.float32),
      jnp.zeros((b, kv, g, bq, h), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(0, _live_key_blocks(idx_i, bk, nk), key_block, init)
    seen_any = l > 0
    out = jnp.where(seen_any[..., None], acc / jnp.where(seen_any, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen_any, m + jnp.log(jnp.where(seen_any, l, 1.0)), 0.0)
    return None, (jnp.einsum("bkgqh->bqkgh", out).astype(q.dtype), lse)

  _, (out_I, lse_I) = jax.lax.scan(query_block, None, jnp.arange(nq))
  out = jnp.moveaxis(out_I, 0, 1).reshape(b, tp, kv, g, h)  # [I, B, Q, ...] -> [B, I*Q, ...]
  lse = jnp.moveaxis(lse_I, 0, 3).reshape(b, kv, g, tp)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(bq, bk, q, k, v, q_seg, kv_seg, q_idx):
  return _forward(bq, bk, q, k, v, q_seg, kv_seg, q_idx)[0]


def _flash_fwd(bq, bk, q, k, v, q_seg, kv_seg, q_idx):
  out, lse = _forward(bq, bk, q, k, v, q_seg, kv_seg, q_idx)
  return out, (q, k, v, q_seg, kv_seg, q_idx, out, lse)


def _flash_bwd(bq, bk, res, d_out):
  """Key blocks outside, query blocks inside: dK and dV of a key block finish in one pass, dQ accumulates."""
  q, k, v, q_seg, kv_seg, q_idx, out, lse = res
  b, tp, kv, g, h = q.shape
  nq, nk = tp // bq, k.shape[1] // bk
  scale = 1.0 / math.sqrt(h)
  d_out = d_out.astype(q.dtype)
  delta = jnp.einsum("bqkgh,bqkgh->bkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  last_col_I = jnp.max(q_idx.reshape(b, nq, bq), axis=(0, 2))  # the furthest column each query block sees

  def key_block(j, carry):
    dq, dk, dv = carry
    k_j = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
    v_j = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
    seg_j = jax.lax.dynamic_slice_in_dim(kv_seg, j * bk, bk, axis=1)
    first_i = jnp.argmax(last_col_I >= j * bk)  # query blocks before it cannot see this key block

    def query_block(i, inner):
      dq, dk_j, dv_j = inner
      q_i = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
      do_i = jax.lax.dynamic_slice_in_dim(d_out, i * bq, bq, axis=1)
      lse_i = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
      delta_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
      seen = _block_mask(
        jax.lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1),
        jax.lax.dynamic_slice_in_dim(q_idx, i * bq, bq, axis=1),
        seg_j,
        j,
        bk,
      )
      p = jnp.where(seen, jnp.exp(_scores(q_i, k_j, scale) - lse_i[..., None]), 0.0)
      dv_j = dv_j + jnp.einsum("bkgqc,bqkgh->bckh", p.astype(v.dtype), do_i, preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqkgh,bckh->bkgqc", do_i, v_j, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_i[..., None]) * scale).astype(q.dtype)
      dk_j = dk_j + jnp.einsum("bkgqc,bqkgh->bckh", ds, q_i, preferred_element_type=jnp.float32)
      dq_i = jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=1)
      dq_i = dq_i + jnp.einsum("bkgqc,bckh->bqkgh", ds, k_j, preferred_element_type=jnp.float32)
      return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * bq, axis=1), dk_j, dv_j

    zeros_j = jnp.zeros((b, bk, kv, h), jnp.float32)
    dq, dk_j, dv_j = jax.lax.fori_loop(first_i, nq, query_block, (dq, zeros_j, zeros_j))
    dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, j * bk, axis=1)
    dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_j, j * bk, axis=1)
    return dq, dk, dv

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dq, dk, dv = jax.lax.fori_loop(0, _live_key_blocks(q_idx, bk, nk), key_block, init)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
