"""TPU Pallas splash attention for square causal self-attention, sharded over batch and heads.

Letters as in `attention.py`. The kernel sees one row at a time (`[N, T, H]` queries, `[K, S, H]` keys: GQA
without repeating keys) and runs under `jax.shard_map` over the batch axes (`data`, `fsdp`) and the head axis
(`tensor`) of the current mesh, each device working on its own rows and heads.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
LANES = 128  # the kernel's blocks are whole multiples of this


@functools.lru_cache(maxsize=32)
def _kernel(num_heads: int, length: int, block: int, interpret: bool):
  mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(num_heads)])
  sizes = splash.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    use_fused_bwd_kernel=True,
  )
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _mesh_axes(batch: int, num_heads: int, num_kv_heads: int):
  """The mesh and the axes that split rows and heads (an axis is used only where it divides evenly)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None, (), None
  batch_axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
  if batch % math.prod(mesh.shape[a] for a in batch_axes):
    batch_axes = ()
  tensor = mesh.shape.get(HEAD_AXIS, 1)
  head_axis = HEAD_AXIS if tensor > 1 and num_kv_heads % tensor == 0 else None
  return mesh, batch_axes, head_axis


def splash_attention(
  q_BTNH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  segment_ids_BT: jax.Array | None,
  *,
  block: int = 512,
  interpret: bool = False,
) -> jax.Array:
  """Causal attention within segments (`segment_ids_BT`; None: one segment per row), T == S.

  The length is padded to a whole number of blocks (multiples of 128, at most `block`) with a segment of its
  own. `interpret=True` runs the
  kernel in the Pallas interpreter (any backend, slow; for tests).
  """
  b, t, n, h = q_BTNH.shape
  if k_BSKH.shape[1] != t:
    raise ValueError(f"splash attention is square: {t} queries but {k_BSKH.shape[1]} keys")
  kv = k_BSKH.shape[2]
  if block % LANES:
    raise ValueError(f"splash attention block={block} must be a multiple of {LANES}")
  blk = min(block, -(-t // LANES) * LANES)
  tp = -(-t // blk) * blk
  if tp != t or segment_ids_BT is None:
    seg = jnp.ones((b, t), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    segment_ids_BT = jnp.pad(seg, ((0, 0), (0, tp - t)), constant_values=-1)
  pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
  q = jnp.pad(q_BTNH * jnp.asarray(1.0 / math.sqrt(h), q_BTNH.dtype), pad)
  k, v = jnp.pad(k_BSKH, pad), jnp.pad(v_BSKH, pad)

  mesh, batch_axes, head_axis = _mesh_axes(b, n, kv)
  local_heads = n // (mesh.shape[head_axis] if head_axis else 1)

  def local(q_BTNH, k_BSKH, v_BSKH, seg_BT):
    kernel = _kernel(local_heads, tp, blk, interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    per_row = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))
    return heads_first(per_row(heads_first(q_BTNH), heads_first(k_BSKH), heads_first(v_BSKH), seg_BT))

  if mesh is None:
    out = local(q, k, v, segment_ids_BT)
  else:
    rows = batch_axes if batch_axes else None
    qkv = P(rows, None, head_axis, None)
    out = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows, None)), out_specs=qkv, check_vma=False)(
      q, k, v, segment_ids_BT
    )
  return out[:, :t]
