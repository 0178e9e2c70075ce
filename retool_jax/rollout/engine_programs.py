"""The embedded engine's compiled programs at the shapes a run leads to, for ahead-of-time compilation.

`engine_programs` lists the largest prefill and decode programs `JaxEngine` (continuous batching) compiles for
`max_batch_size` slots of `max_length` tokens: the packed prefill of `max_prefill_rows` rows of up to
`prefill_chunk` prompt tokens and the decode chunk over every slot, both attending over the whole slot length
(the worst bucket), and with a kept-prefix pool the copy that parks and restores a slot's worth of rows. The policy's weights are held as the engine holds them (a copy sharded like the policy),
the KV cache with KV heads over `tensor` and slots over `data` / `fsdp`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from retool_jax.models.qwen3 import Qwen3
from retool_jax.programs import Program
from retool_jax.rollout import slot_programs
from retool_jax.rollout.jax_engine import pool_rows, with_attention
from retool_jax.rollout.slot_scheduler import bucket


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
  prefill_chunk: int = 512,
  max_prefill_rows: int = 16,
  max_stop_ids: int = 8,
  attention_impl: str | None = "blockwise",
  kv_cache_gib: float | None = None,
  prefix_pool: int | None = None,
  resident: tuple = (),
) -> list[Program]:
  """`[prefill, decode]` (and `move` with a pool) of the slot engine: `max_batch_size` slots of `max_length`
  tokens and the kept-prefix pool.

  Args:
    model: the policy, abstract or real, whose variables carry the shardings the engine keeps (its copy of the
      policy's weights).
    mesh: the run's mesh; slots go over its data axes, KV heads over `tensor`.
    max_batch_size / decode_chunk / prefill_chunk / max_prefill_rows / max_stop_ids / min_prompt_bucket: as
      given to `JaxEngine`.
    prompt_len / max_length: the longest prompt and the context limit (prompt + generation).
    num_stop_ids: stop tokens per request (EOS and the request's stop ids); at most `max_stop_ids`.
    attention_impl: as given to `JaxEngine` (the attention over the cache).
    kv_cache_gib / prefix_pool: as given to `JaxEngine` (the pool's rows; `kv_cache_gib` does not cap the slots
      here).
    min_new_bucket: unused (static batching's budget bucket), accepted for compatibility.
    resident: what else the run keeps on the devices while the engine runs (`Program.resident`).
  """
  del min_new_bucket
  if not 0 < prompt_len < max_length:
    raise ValueError(f"prompt_len={prompt_len} must be in [1, max_length={max_length})")
  if num_stop_ids > max_stop_ids:
    raise ValueError(f"num_stop_ids={num_stop_ids} is more than max_stop_ids={max_stop_ids}")
  b, s, w = max_batch_size, max_length, max_stop_ids
  r = bucket(min(max_prefill_rows, b), 1)
  t = bucket(min(prompt_len, prefill_chunk), min_prompt_bucket)
  graphdef, params = nnx.split(with_attention(model, attention_impl))
  cfg = model.config
  counts = {k: n for k in ("dense", "moe") if (n := sum(1 for kk, _ in model.layer_plan if kk == k))}
  replicated = NamedSharding(mesh, PartitionSpec())
  if prefix_pool is None:
    per_token = (
      2 * sum(counts.values()) * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(cfg.jnp_dtype).itemsize
    )
    prefix_pool = pool_rows(per_token * s, b, kv_cache_gib)

  def sds(x, sharding=replicated):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  state = jax.eval_shape(
    lambda: slot_programs.init_state(
      counts, b, s, cfg.num_key_value_heads, cfg.head_dim, cfg.jnp_dtype, w, pool=prefix_pool
    )
  )
  state = jax.tree.map(sds, state)
  for kind in counts:
    for group in (state.cache.k, state.cache.v, state.pool_k, state.pool_v):
      group[kind] = sds(group[kind], slot_programs.cache_sharding(mesh, group[kind].shape))
  i32, f32 = jnp.int32, jnp.float32
  rows = slot_programs.PrefillRows(
    *(jax.ShapeDtypeStruct(shape, dtype, sharding=replicated) for shape, dtype in (
      ((r,), i32), ((r,), i32), ((r,), i32), ((r, t), i32), ((r,), i32), ((r,), bool), ((r,), f32), ((r,), f32),
      ((r,), i32), ((r, 2), jnp.uint32), ((r,), i32), ((r, w), i32),
    ))
  )  # fmt: skip
  keep = jax.ShapeDtypeStruct((b,), bool, sharding=replicated)
  moves = []
  if prefix_pool:
    n = bucket(b, 1)
    index = jax.ShapeDtypeStruct((n,), i32, sharding=replicated)
    moves.append(
      Program(
        f"engine/move[rows={n},slots={b},pool={prefix_pool},cache={s}]",
        slot_programs.move_rows,
        (state, index, index, index, index, index),
        {},
        resident,
      )
    )
  return [
    Program(
      f"engine/prefill[rows={r},t={t},slots={b},cache={s}]",
      slot_programs.prefill,
      (graphdef, params, state, rows),
      dict(attend_length=s),
      resident,
    ),
    Program(
      f"engine/decode[slots={b},cache={s},steps={decode_chunk}]",
      slot_programs.decode_chunk,
      (graphdef, params, state, keep, keep),
      dict(steps=decode_chunk, attend_length=s),
      resident,
    ),
    *moves,
  ]
