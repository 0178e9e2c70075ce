"""The embedded engine's compiled programs at the shapes a run leads to, for ahead-of-time compilation.

`engine_programs` lists the prefill and decode programs `JaxEngine` compiles for a batch of `max_batch_size`
rows whose prompts hold up to `prompt_len` tokens and may grow to `max_length`: the engine's bucketing (powers of
two for rows, prompt length and new-token budget) applied to those sizes, with the policy's weights as the
engine holds them (a copy sharded like the policy) and the batch laid out over the mesh's data axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from retool_jax.models.qwen3 import Qwen3
from retool_jax.programs import Program
from retool_jax.rollout import jax_engine


def _rows_sharding(mesh, rows: int, ndim: int, axis: int = 0) -> NamedSharding:
  batch = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
  shards = 1
  for a in batch:
    shards *= mesh.shape[a]
  spec = [None] * ndim
  if batch and rows % shards == 0:
    spec[axis] = batch if len(batch) > 1 else batch[0]
  return NamedSharding(mesh, PartitionSpec(*spec))


def _sds(shape, dtype, mesh, axis: int = 0) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(
    shape, dtype, sharding=_rows_sharding(mesh, shape[axis] if shape else 1, len(shape), axis)
  )


def engine_programs(
  model: Qwen3,
  mesh: jax.sharding.Mesh,
  *,
  max_batch_size: int,
  prompt_len: int,
  max_length: int,
  decode_chunk: int,
  num_stop_ids: int = 1,
  min_prompt_bucket: int = 16,
  min_new_bucket: int = 16,
  resident: tuple = (),
) -> list[Program]:
  """`[prefill, decode]` of one engine batch: `max_batch_size` rows, prompts of up to `prompt_len` tokens
  generating until `max_length` tokens.

  Args:
    model: the policy, abstract or real, whose variables carry the shardings the engine keeps (its copy of the
      policy's weights).
    mesh: the run's mesh; batch rows go over its data axes.
    max_batch_size / decode_chunk: as given to `JaxEngine`.
    prompt_len / max_length: the longest prompt of the batch and the context limit (prompt + generation).
    num_stop_ids: stop tokens per row (EOS and the request's stop ids).
    min_prompt_bucket / min_new_bucket: the engine's smallest buckets.
    resident: what else the run keeps on the devices while the engine runs (`Program.resident`).
  """
  if not 0 < prompt_len < max_length:
    raise ValueError(f"prompt_len={prompt_len} must be in [1, max_length={max_length})")
  b = jax_engine._bucket(max_batch_size, 1)
  t = jax_engine._bucket(prompt_len, min_prompt_bucket)
  new_len = jax_engine._bucket(max_length - prompt_len, min_new_bucket)
  graphdef, params = nnx.split(model)
  rows = jax_engine._RowParams(
    _sds((b,), jnp.float32, mesh),
    _sds((b,), jnp.float32, mesh),
    _sds((b,), jnp.int32, mesh),
    _sds((b, 2), jnp.uint32, mesh),
    _sds((b,), jnp.int32, mesh),
    _sds((b, max(1, num_stop_ids)), jnp.int32, mesh),
  )
  ids = _sds((b, t), jnp.int32, mesh)
  prefill = Program(
    f"engine/prefill[b={b},t={t},cache={t + new_len}]",
    jax_engine._prefill,
    (graphdef, params, ids, ids, rows),
    dict(cache_len=t + new_len, new_len=new_len),
    resident,
  )
  with jax.set_mesh(mesh):
    state = jax.eval_shape(
      lambda p, i, r: jax_engine._prefill(graphdef, p, i, i, r, cache_len=t + new_len, new_len=new_len),
      params,
      ids,
      rows,
    )
  cache_axis = lambda x: 1 if x.ndim == 5 else 0  # noqa: E731  (cache k/v are [layers, B, S, K, H])
  state = jax.tree.map(
    lambda x: (
      _sds(x.shape, x.dtype, mesh, cache_axis(x))
      if x.ndim
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    ),
    state,
  )
  decode = Program(
    f"engine/decode[b={b},cache={t + new_len},steps={decode_chunk}]",
    jax_engine._decode_chunk,
    (graphdef, params, state, rows),
    dict(steps=decode_chunk),
    resident,
  )
  return [prefill, decode]
