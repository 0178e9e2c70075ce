"""Static batching (`JaxEngine(..., batching="static")`): one left-padded batch runs until its last row ends.

Rows, prompt length and new-token budget are bucketed to powers of two. A batch is one left-padded prefill (only
its last position is projected to the vocabulary) followed by jitted decode chunks; stop tokens end a row inside
a chunk, stop strings are matched on the host between chunks. Finished rows keep being computed (masked) until
the whole batch ends: the baseline the slot scheduler is measured against.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retool_jax.models.kv_cache import KVCache
from retool_jax.rollout.sampling import find_stop_string, sample
from retool_jax.rollout.types import FinishReason, GenerateRequest, GenerateResult, SamplingParams


def bucket(n: int, minimum: int) -> int:
  return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class _DecodeState:
  """Device state of a batch between decode chunks."""

  cache: KVCache
  last_B: jax.Array  # the token to feed next
  out_BN: jax.Array  # generated tokens
  logprobs_BN: jax.Array
  count_B: jax.Array  # tokens generated so far
  done_B: jax.Array


jax.tree_util.register_dataclass(
  _DecodeState, data_fields=[f.name for f in dataclasses.fields(_DecodeState)], meta_fields=[]
)


@dataclasses.dataclass(frozen=True)
class _RowParams:
  """Per-row sampling parameters as device arrays."""

  temperature_B: jax.Array
  top_p_B: jax.Array
  top_k_B: jax.Array
  keys_B2: jax.Array
  max_new_B: jax.Array
  stop_ids_BS: jax.Array  # -1 padded


jax.tree_util.register_dataclass(
  _RowParams, data_fields=[f.name for f in dataclasses.fields(_RowParams)], meta_fields=[]
)


def _finish_step(state: _DecodeState, tokens_B, logprobs_B, rows: _RowParams) -> _DecodeState:
  """Records one sampled token per unfinished row and marks rows that hit a stop token or their budget."""
  live = ~state.done_B
  idx = jnp.minimum(state.count_B, state.out_BN.shape[1] - 1)
  b = jnp.arange(tokens_B.shape[0])
  out = state.out_BN.at[b, idx].set(jnp.where(live, tokens_B, state.out_BN[b, idx]))
  lps = state.logprobs_BN.at[b, idx].set(jnp.where(live, logprobs_B, state.logprobs_BN[b, idx]))
  count = state.count_B + live
  stopped = jnp.any(tokens_B[:, None] == rows.stop_ids_BS, axis=-1)
  done = state.done_B | (live & (stopped | (count >= rows.max_new_B)))
  return _DecodeState(state.cache, jnp.where(live, tokens_B, state.last_B), out, lps, count, done)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "new_len"), donate_argnames=())
def _prefill(graphdef, params, ids_BT, mask_BT, rows: _RowParams, *, cache_len: int, new_len: int):
  model = nnx.merge(graphdef, params)
  b, t = ids_BT.shape
  cache = model.init_cache(b, cache_len)
  if t > 1:  # only the last position's logits are used: the [B, T-1, V] projection of the rest is never built
    _, cache = model.forward_cached(ids_BT[:, :-1], cache, attention_mask=mask_BT[:, :-1])
  logits, cache = model.forward_cached(ids_BT[:, -1:], cache, attention_mask=mask_BT[:, -1:])
  state = _DecodeState(
    cache,
    jnp.zeros((b,), jnp.int32),
    jnp.zeros((b, new_len), jnp.int32),
    jnp.zeros((b, new_len), jnp.float32),
    jnp.zeros((b,), jnp.int32),
    rows.max_new_B <= 0,
  )
  tokens, lps = sample(logits[:, -1], rows.temperature_B, rows.top_p_B, rows.top_k_B, rows.keys_B2, state.count_B)
  return _finish_step(state, tokens, lps, rows)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"), donate_argnames=("state",))
def _decode_chunk(graphdef, params, state: _DecodeState, rows: _RowParams, *, steps: int) -> _DecodeState:
  model = nnx.merge(graphdef, params)
  room = state.cache.max_length - jnp.max(state.cache.index_B)

  def cond(carry):
    i, s = carry
    return (i < jnp.minimum(steps, room)) & ~jnp.all(s.done_B)

  def body(carry):
    i, s = carry
    live = ~s.done_B
    logits, cache = model.forward_cached(s.last_B[:, None], s.cache, attention_mask=live[:, None])
    s = dataclasses.replace(s, cache=cache)
    tokens, lps = sample(logits[:, -1], rows.temperature_B, rows.top_p_B, rows.top_k_B, rows.keys_B2, s.count_B)
    return i + 1, _finish_step(s, tokens, lps, rows)

  _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
  return state


class StaticBatcher:
  """Runs one batch of (request, budget, seed) rows to completion."""

  def __init__(self, engine):
    self.engine = engine

  def decode(self, graphdef, params, rows: list[tuple[GenerateRequest, int, int]]) -> list[GenerateResult]:
    n = len(rows)
    b = bucket(n, self.engine.min_batch_bucket)
    t = bucket(max(len(r.prompt_ids) for r, _, _ in rows), self.engine.min_prompt_bucket)
    new_len = bucket(max(m for _, m, _ in rows), self.engine.min_new_bucket)
    ids = np.full((b, t), self.engine.pad_id, np.int32)
    mask = np.zeros((b, t), np.int32)
    for j, (r, _, _) in enumerate(rows):
      ids[j, t - len(r.prompt_ids) :] = r.prompt_ids
      mask[j, t - len(r.prompt_ids) :] = 1
    mask[n:, -1] = 1  # padding rows hold one token so that no attention row is empty
    row_params = self._row_params(rows, b)
    state = _prefill(
      graphdef, params, jnp.asarray(ids), jnp.asarray(mask), row_params, cache_len=t + new_len, new_len=new_len
    )
    stop_strings = [r.sampling.stop for r, _, _ in rows]
    checked = [0] * n
    cut: dict[int, tuple[int, str]] = {}  # row -> (last token index, stop string)
    while True:
      if any(stop_strings):
        count = np.asarray(state.count_B)
        out = np.asarray(state.out_BN)
        host_done = np.asarray(state.done_B).copy()
        for j in range(n):
          if j in cut or not stop_strings[j]:
            continue
          hit = find_stop_string(
            out[j, : count[j]].tolist(), checked[j], stop_strings[j], self.engine.tokenizer.decode
          )
          checked[j] = int(count[j])
          if hit is not None:
            cut[j] = hit
            host_done[j] = True
        if len(cut) and not np.array_equal(host_done, np.asarray(state.done_B)):
          state = dataclasses.replace(state, done_B=jnp.asarray(host_done))
      if bool(jnp.all(state.done_B)) or int(jnp.max(state.cache.index_B)) >= state.cache.max_length:
        break
      state = _decode_chunk(graphdef, params, state, row_params, steps=self.engine.decode_chunk)
      self.engine.stats["decode_chunks"] += 1
    steps = int(jnp.max(state.cache.index_B)) - t  # decode steps the batch ran (every row, finished or not)
    self.engine.stats["decode_steps"] += steps
    self.engine.stats["slot_steps"] += steps * b
    self.engine.stats["prefill_calls"] += 1
    self.engine.stats["prefill_tokens"] += sum(len(r.prompt_ids) for r, _, _ in rows)
    self.engine.stats["prefill_padded_tokens"] += b * t
    self.engine.programs.add(("prefill", b, t, new_len))
    self.engine.programs.add(("decode", b, t + new_len))
    count, out, lps = np.asarray(state.count_B), np.asarray(state.out_BN), np.asarray(state.logprobs_BN)
    results = []
    stop_sets = [set(self.engine.eos_token_ids) | set(r.sampling.stop_token_ids) for r, _, _ in rows]
    for j, (r, _, _) in enumerate(rows):
      k = int(count[j])
      if j in cut:
        k = cut[j][0] + 1
        reason = FinishReason("stop", cut[j][1])
      elif k and int(out[j, k - 1]) in stop_sets[j]:
        reason = FinishReason("stop", int(out[j, k - 1]))
      else:
        reason = FinishReason("length")
      results.append(
        GenerateResult(
          out[j, :k].tolist(),
          lps[j, :k].astype(float).tolist(),
          reason,
          meta={"prompt_tokens": len(r.prompt_ids), "request_id": r.request_id},
        )
      )
      self.engine.stats["generated_tokens"] += k
      self.engine.stats["useful_tokens"] += max(0, int(count[j]) - 1)
    self.engine.stats["batches"] += 1
    self.engine.stats["rows"] += n
    return results

  def _row_params(self, rows: list[tuple[GenerateRequest, int, int]], b: int) -> _RowParams:
    n = len(rows)
    stop_lists = [tuple(self.engine.eos_token_ids) + tuple(r.sampling.stop_token_ids) for r, _, _ in rows]
    width = max(1, max(len(s) for s in stop_lists))
    stop_ids = np.full((b, width), -1, np.int32)
    for j, s in enumerate(stop_lists):
      stop_ids[j, : len(s)] = s
    sp: list[SamplingParams] = [r.sampling for r, _, _ in rows] + [SamplingParams(temperature=0.0)] * (b - n)
    seeds = [seed for _, _, seed in rows] + [0] * (b - n)
    keys = np.stack([np.asarray(jax.random.PRNGKey(s)) for s in seeds])
    max_new = np.asarray([m for _, m, _ in rows] + [0] * (b - n), np.int32)
    return _RowParams(
      jnp.asarray([s.temperature for s in sp], jnp.float32),
      jnp.asarray([s.top_p for s in sp], jnp.float32),
      jnp.asarray([s.top_k for s in sp], jnp.int32),
      jnp.asarray(keys),
      jnp.asarray(max_new),
      jnp.asarray(stop_ids),
    )
