"""Blockwise (flash-style) attention in plain JAX: online softmax over key blocks, custom VJP.

Letters as in `attention.py`; Q and C are query and key block lengths, I and J count query and key blocks.

Memory is O(T x C) per head in the forward and the backward pass: the backward recomputes each block's
probabilities from the saved log-sum-exp instead of keeping the `[T, S]` matrix. Key blocks past the last
column any query may see are never visited (a decode step over a long cache reads only its written prefix), and
each query block stops at the last key block its own queries reach. Rows that see no key give 0.

Ragged (`ragged=True`, the KV-cache calls of prefill and decode): each row visits only
its own key blocks, up to the last column its queries reach, so the rows of a decode batch cost what their own
lengths cost rather than the longest row's. Rows are ordered by how many blocks they need; key block `j` is
computed for the rows that reach it, `ragged_rows` at a time (all of them while more than half the batch
does). Every row goes through the same per-block arithmetic, in the same order, as in the dense schedule.
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
  ragged: bool = False,
  ragged_rows: int = 8,
) -> jax.Array:
  """Attention output `[B, T, N, H]` under the segment / key-column rule of `AttentionMask`.

  Block lengths are clipped to T and S; both axes are padded to a whole number of blocks. `ragged`: each row
  visits only its own key blocks, `ragged_rows` rows per call of a block (the backward pass is the dense one).
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
  rows = min(ragged_rows, b) if ragged and sp > bk and b > 1 else 0
  out = _flash(bq, bk, rows, q, k, v, q_seg, kv_seg, q_idx)
  return out[:, :t].reshape(b, t, n, h)


def _block_mask(q_seg_BQ, q_idx_BQ, kv_seg_BC, j, bk):
  col = j * bk + jnp.arange(bk, dtype=jnp.int32)
  same = q_seg_BQ[:, :, None] == kv_seg_BC[:, None, :]
  return (same & (col[None, None, :] <= q_idx_BQ[:, :, None]))[:, None, None]  # [B, 1, 1, Q, C]


def _scores(q_BQKGH, k_BCKH, scale):
  return jnp.einsum("bqkgh,bckh->bkgqc", q_BQKGH, k_BCKH, preferred_element_type=jnp.float32) * scale


def _loop(lower, upper, num_blocks: int, body, init):
  """`fori_loop(lower, upper, body, init)`; with a single block, that block's body inline (no loop to compile
  or run: short sequences cost what one dense block costs)."""
  if num_blocks == 1:
    return body(0, init)
  return jax.lax.fori_loop(lower, upper, body, init)


def _live_key_blocks(q_idx_BQ, bk: int, num_k_blocks: int):
  """How many key blocks (from the first) these queries may see: those up to the largest column."""
  return jnp.clip((jnp.max(q_idx_BQ) + bk) // bk, 0, num_k_blocks)


def _key_block_update(q_i, k_j, v_j, seen, scale, carry):
  """One key block of the online softmax: `(m, l, acc)` of the queries `q_i` after keys `k_j`."""
  m, l, acc = carry
  s_ = _scores(q_i, k_j, scale)
  m_new = jnp.maximum(m, jnp.max(jnp.where(seen, s_, _NEG), axis=-1))
  p = jnp.where(seen, jnp.exp(s_ - m_new[..., None]), 0.0)
  alpha = jnp.exp(m - m_new)
  pv = jnp.einsum("bkgqc,bckh->bkgqh", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
  return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv


def _finish_block(m, l, acc, dtype):
  """Output `[B, Q, K, G, H]` and log-sum-exp `[B, K, G, Q]` of a query block's accumulators."""
  seen_any = l > 0
  out = jnp.where(seen_any[..., None], acc / jnp.where(seen_any, l, 1.0)[..., None], 0.0)
  lse = jnp.where(seen_any, m + jnp.log(jnp.where(seen_any, l, 1.0)), 0.0)
  return jnp.einsum("bkgqh->bqkgh", out).astype(dtype), lse


def _init_block(b, kv, g, bq, h):
  return (
    jnp.full((b, kv, g, bq), _NEG, jnp.float32),
    jnp.zeros((b, kv, g, bq), jnp.float32),
    jnp.zeros((b, kv, g, bq, h), jnp.float32),
  )


def _ragged_forward(bq, bk, rows, q, k, v, q_seg, kv_seg, q_idx):
  """The forward pass with every row visiting only its own key blocks (see the module docstring)."""
  b, tp, kv, g, h = q.shape
  nq, nk = tp // bq, k.shape[1] // bk
  scale = 1.0 / math.sqrt(h)
  k_BJCKH = k.reshape(b, nk, bk, kv, h)
  v_BJCKH = v.reshape(b, nk, bk, kv, h)
  seg_BJC = kv_seg.reshape(b, nk, bk)

  def query_block(_, i):
    q_i = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
    seg_i = jax.lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1)
    idx_i = jax.lax.dynamic_slice_in_dim(q_idx, i * bq, bq, axis=1)
    blocks_B = jnp.clip((jnp.max(idx_i, axis=1) + bk) // bk, 0, nk)
    order_B = jnp.argsort(-blocks_B, stable=True)  # rows needing the most blocks first
    need_B = blocks_B[order_B]

    def update(j, carry, r_R):
      """Key block j for the rows at sorted positions `r_R` (positions past the batch write nothing)."""
      rows_R = order_B[jnp.minimum(r_R, b - 1)]
      seen = _block_mask(seg_i[rows_R], idx_i[rows_R], seg_BJC[rows_R, j], j, bk)
      take = lambda x: x[jnp.minimum(r_R, b - 1)]
      new = _key_block_update(q_i[rows_R], k_BJCKH[rows_R, j], v_BJCKH[rows_R, j], seen, scale, map(take, carry))
      return tuple(x.at[r_R].set(y, mode="drop") for x, y in zip(carry, new))

    def key_block(j, carry):
      reach = jnp.sum(need_B > j)  # the rows that see block j: sorted positions [0, reach)

      def some(carry):
        def chunk(c, carry):
          r_R = c * rows + jnp.arange(rows)
          return update(j, carry, jnp.where(r_R < reach, r_R, b))

        return jax.lax.fori_loop(0, -(-reach // rows), chunk, carry)

      return jax.lax.cond(2 * reach > b, lambda c: update(j, c, jnp.arange(b)), some, carry)

    m, l, acc = jax.lax.fori_loop(0, need_B[0], key_block, _init_block(b, kv, g, bq, h))
    inverse_B = jnp.argsort(order_B)
    return None, _finish_block(m[inverse_B], l[inverse_B], acc[inverse_B], q.dtype)

  return _query_blocks(query_block, nq, b, tp, kv, g, h)


def _query_blocks(query_block, nq, b, tp, kv, g, h):
  """Runs `query_block` over the query blocks; output `[B, Tp, K, G, H]`, log-sum-exp `[B, K, G, Tp]`."""
  if nq == 1:
    out_I, lse_I = jax.tree.map(lambda x: x[None], query_block(None, 0)[1])
  else:
    _, (out_I, lse_I) = jax.lax.scan(query_block, None, jnp.arange(nq))
  out = jnp.moveaxis(out_I, 0, 1).reshape(b, tp, kv, g, h)
  lse = jnp.moveaxis(lse_I, 0, 3).reshape(b, kv, g, tp)
  return out, lse


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
      k_j = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
      v_j = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
      seen = _block_mask(seg_i, idx_i, jax.lax.dynamic_slice_in_dim(kv_seg, j * bk, bk, axis=1), j, bk)
      return _key_block_update(q_i, k_j, v_j, seen, scale, carry)

    m, l, acc = _loop(0, _live_key_blocks(idx_i, bk, nk), nk, key_block, _init_block(b, kv, g, bq, h))
    return None, _finish_block(m, l, acc, q.dtype)

  return _query_blocks(query_block, nq, b, tp, kv, g, h)


def _any_forward(bq, bk, rows, q, k, v, q_seg, kv_seg, q_idx):
  """The ragged forward pass with `rows` rows per block call, the dense one when `rows` is 0."""
  if rows:
    return _ragged_forward(bq, bk, rows, q, k, v, q_seg, kv_seg, q_idx)
  return _forward(bq, bk, q, k, v, q_seg, kv_seg, q_idx)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(bq, bk, rows, q, k, v, q_seg, kv_seg, q_idx):
  return _any_forward(bq, bk, rows, q, k, v, q_seg, kv_seg, q_idx)[0]


def _flash_fwd(bq, bk, rows, q, k, v, q_seg, kv_seg, q_idx):
  out, lse = _any_forward(bq, bk, rows, q, k, v, q_seg, kv_seg, q_idx)
  return out, (q, k, v, q_seg, kv_seg, q_idx, out, lse)


def _flash_bwd(bq, bk, rows, res, d_out):
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
    dq, dk_j, dv_j = _loop(first_i, nq, nq, query_block, (dq, zeros_j, zeros_j))
    dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, j * bk, axis=1)
    dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_j, j * bk, axis=1)
    return dq, dk, dv

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dq, dk, dv = _loop(0, _live_key_blocks(q_idx, bk, nk), nk, key_block, init)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
