"""The embedded engine: batched KV-cache generation with the policy's own weights, in process.

    engine = JaxEngine(model, tokenizer=tokenizer)
    [result] = await engine.generate([GenerateRequest(prompt_ids, SamplingParams(temperature=1.0, stop=("</code>",)))])
    await engine.update_weights(nnx.state(trained_model), version=step)

Concurrent `generate` calls are gathered for `batch_window_s` and run together (up to `max_batch_size` rows).
Shapes are bucketed (rows, prompt length and new-token budget to powers of two), so a steady workload compiles
a handful of programs once. A batch is one left-padded prefill (only its last position is projected to the
vocabulary) followed by jitted decode chunks of `decode_chunk` steps; stop tokens end a row inside the chunk,
stop strings are matched on the host between chunks, and the batch ends as soon as every row has finished.
The device work runs in a worker thread, so the event loop keeps serving tool calls while the model decodes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retool_jax.models.kv_cache import KVCache
from retool_jax.models.qwen3 import Qwen3
from retool_jax.rollout.sampling import find_stop_string, sample
from retool_jax.rollout.types import FinishReason, GenerateRequest, GenerateResult, SamplingParams

__all__ = ["JaxEngine"]


def _bucket(n: int, minimum: int) -> int:
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
  room = state.cache.max_length - state.cache.index

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


@dataclasses.dataclass
class _Pending:
  request: GenerateRequest
  future: asyncio.Future


class JaxEngine:
  """Generation with an in-process Qwen3 (see the module docstring).

  Args:
    model: the policy (its weights are copied out; later changes reach the engine through `update_weights`).
    tokenizer: needed for stop strings (decoding between chunks).
    eos_token_ids: stop tokens added to every request (default: the model config's EOS).
    max_length: longest prompt + generation; longer requests are cut to fit (finish `length`).
    max_batch_size: rows per batch; larger bursts run as several batches.
    decode_chunk: decode steps per jitted call (stop strings are checked between calls).
    batch_window_s: how long the batcher waits for more requests before launching a batch.
    min_batch_bucket / min_prompt_bucket / min_new_bucket: smallest padded batch / prompt length / new-token
      budget (larger minimums: fewer programs to compile, more padding).
    seed: draws the keys of requests without a seed.
  """

  def __init__(
    self,
    model: Qwen3,
    *,
    tokenizer: Any = None,
    eos_token_ids: Sequence[int] | None = None,
    max_length: int | None = None,
    max_batch_size: int = 64,
    decode_chunk: int = 16,
    batch_window_s: float = 0.005,
    min_batch_bucket: int = 1,
    min_prompt_bucket: int = 16,
    min_new_bucket: int = 16,
    pad_id: int = 0,
    seed: int = 0,
    weight_version: int | str | None = 0,
  ):
    if max_batch_size < 1 or decode_chunk < 1:
      raise ValueError(f"max_batch_size={max_batch_size} and decode_chunk={decode_chunk} must be >= 1")
    self._graphdef, params = nnx.split(model)
    # Committed arrays, like the ones `update_weights` places, so that a swap reuses the compiled programs.
    self._params = jax.tree.map(lambda a: jax.device_put(a, a.sharding), params)
    self.config = model.config
    self.tokenizer = tokenizer
    if eos_token_ids is None:
      eos_token_ids = () if model.config.eos_token_id is None else (model.config.eos_token_id,)
    self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
    self.max_length = int(max_length or model.config.max_position_embeddings)
    self.max_batch_size = max_batch_size
    self.decode_chunk = decode_chunk
    self.batch_window_s = batch_window_s
    self.min_batch_bucket = min(min_batch_bucket, max_batch_size)
    self.min_prompt_bucket = min_prompt_bucket
    self.min_new_bucket = min_new_bucket
    self.pad_id = pad_id
    self.weight_version = weight_version
    self._seeds = np.random.default_rng(seed)
    self._queue: asyncio.Queue[_Pending] | None = None
    self._loop: asyncio.AbstractEventLoop | None = None
    self._worker: asyncio.Task | None = None
    self._device_lock = threading.Lock()
    self.stats = {"batches": 0, "rows": 0, "generated_tokens": 0, "decode_chunks": 0}

  # ---- Engine protocol ---------------------------------------------------------------------------

  async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
    """Generates for every request; concurrent calls share batches. Results are in request order."""
    for i, r in enumerate(requests):
      self._check(i, r)
    if not requests:
      return []
    queue = self._ensure_worker()
    loop = asyncio.get_running_loop()
    pending = [_Pending(r, loop.create_future()) for r in requests]
    for p in pending:
      queue.put_nowait(p)
    return list(await asyncio.gather(*(p.future for p in pending)))

  async def update_weights(self, params: Any, version: int | str | None = None) -> None:
    """Swaps in new weights (a `Qwen3`, an `nnx.State` or a nested dict of arrays with the model's layout).

    Batches already running finish with the weights they started with; later batches use the new ones.
    Matching shapes and dtypes reuse the compiled programs.
    """
    new = await asyncio.to_thread(self._convert_params, params)
    with self._device_lock:
      self._params = new
      self.weight_version = version

  async def health(self) -> bool:
    worker = self._worker
    return worker is None or not worker.done() or worker.cancelled()

  async def close(self) -> None:
    """Stops the batcher on the running loop; requests still queued fail with `CancelledError`.

    The engine stays usable: the next `generate` starts a new batcher.
    """
    worker, queue = self._worker, self._queue
    self._worker = self._queue = self._loop = None
    if worker is None or worker.done():
      return
    worker.cancel()
    await asyncio.gather(worker, return_exceptions=True)
    while queue is not None and not queue.empty():
      pending = queue.get_nowait()
      if not pending.future.done():
        pending.future.cancel()

  # ---- batching ----------------------------------------------------------------------------------

  def _ensure_worker(self) -> asyncio.Queue:
    loop = asyncio.get_running_loop()
    if self._loop is not loop or self._worker is None or self._worker.done():
      self._loop, self._queue = loop, asyncio.Queue()
      self._worker = loop.create_task(self._serve(self._queue))
    return self._queue

  async def _serve(self, queue: asyncio.Queue) -> None:
    while True:
      batch = [await queue.get()]
      deadline = asyncio.get_running_loop().time() + self.batch_window_s
      while len(batch) < self.max_batch_size:
        timeout = deadline - asyncio.get_running_loop().time()
        if timeout <= 0 and queue.empty():
          break
        try:
          batch.append(queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(queue.get(), timeout))
        except asyncio.TimeoutError:
          break
      batch = [p for p in batch if not p.future.done()]
      if not batch:
        continue
      try:
        results = await asyncio.to_thread(self._run_batch, [p.request for p in batch])
      except Exception as e:  # noqa: BLE001  (a failed batch fails its callers, not the server)
        for p in batch:
          if not p.future.done():
            p.future.set_exception(e)
        continue
      for p, r in zip(batch, results):
        if not p.future.done():
          p.future.set_result(r)

  def _check(self, i: int, r: GenerateRequest) -> None:
    if not isinstance(r, GenerateRequest):
      raise TypeError(f"requests[{i}] must be a GenerateRequest, got {type(r).__name__}")
    if not r.prompt_ids:
      raise ValueError(f"requests[{i}].prompt_ids is empty")
    bad = [t for t in r.prompt_ids if not 0 <= int(t) < self.config.vocab_size]
    if bad:
      raise ValueError(
        f"requests[{i}].prompt_ids has ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}"
      )
    if r.sampling.stop and self.tokenizer is None:
      raise ValueError(
        f"requests[{i}].sampling.stop={r.sampling.stop!r} needs a tokenizer: JaxEngine(model, tokenizer=...)"
      )

  # ---- one batch on the device -------------------------------------------------------------------

  def _run_batch(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
    with self._device_lock:
      graphdef, params, version = self._graphdef, self._params, self.weight_version
    results: list[GenerateResult | None] = [None] * len(requests)
    live = []
    for i, r in enumerate(requests):
      room = self.max_length - len(r.prompt_ids)
      if room < 1:
        results[i] = GenerateResult(
          [],
          [],
          FinishReason(
            "abort",
            message=(f"prompt of {len(r.prompt_ids)} tokens leaves no room within max_length={self.max_length}"),
          ),
          version,
        )
      else:
        live.append((i, r, min(r.sampling.max_new_tokens, room)))
    if live:
      for (i, _, _), res in zip(live, self._decode(graphdef, params, [(r, n) for _, r, n in live])):
        res.weight_version = version
        results[i] = res
    return results  # type: ignore[return-value]

  def _decode(self, graphdef, params, rows: list[tuple[GenerateRequest, int]]) -> list[GenerateResult]:
    n = len(rows)
    b = _bucket(n, self.min_batch_bucket)
    t = _bucket(max(len(r.prompt_ids) for r, _ in rows), self.min_prompt_bucket)
    new_len = _bucket(max(m for _, m in rows), self.min_new_bucket)
    ids = np.full((b, t), self.pad_id, np.int32)
    mask = np.zeros((b, t), np.int32)
    for j, (r, _) in enumerate(rows):
      ids[j, t - len(r.prompt_ids) :] = r.prompt_ids
      mask[j, t - len(r.prompt_ids) :] = 1
    mask[n:, -1] = 1  # padding rows hold one token so that no attention row is empty
    row_params = self._row_params(rows, b)
    state = _prefill(
      graphdef, params, jnp.asarray(ids), jnp.asarray(mask), row_params, cache_len=t + new_len, new_len=new_len
    )
    stop_strings = [r.sampling.stop for r, _ in rows]
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
          hit = find_stop_string(out[j, : count[j]].tolist(), checked[j], stop_strings[j], self.tokenizer.decode)
          checked[j] = int(count[j])
          if hit is not None:
            cut[j] = hit
            host_done[j] = True
        if len(cut) and not np.array_equal(host_done, np.asarray(state.done_B)):
          state = dataclasses.replace(state, done_B=jnp.asarray(host_done))
      if bool(jnp.all(state.done_B)) or int(state.cache.index) >= state.cache.max_length:
        break
      state = _decode_chunk(graphdef, params, state, row_params, steps=self.decode_chunk)
      self.stats["decode_chunks"] += 1
    count, out, lps = np.asarray(state.count_B), np.asarray(state.out_BN), np.asarray(state.logprobs_BN)
    results = []
    stop_sets = [set(self.eos_token_ids) | set(r.sampling.stop_token_ids) for r, _ in rows]
    for j, (r, budget) in enumerate(rows):
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
      self.stats["generated_tokens"] += k
    self.stats["batches"] += 1
    self.stats["rows"] += n
    return results

  def _row_params(self, rows: list[tuple[GenerateRequest, int]], b: int) -> _RowParams:
    n = len(rows)
    stop_lists = [tuple(self.eos_token_ids) + tuple(r.sampling.stop_token_ids) for r, _ in rows]
    width = max(1, max(len(s) for s in stop_lists))
    stop_ids = np.full((b, width), -1, np.int32)
    for j, s in enumerate(stop_lists):
      stop_ids[j, : len(s)] = s
    sp: list[SamplingParams] = [r.sampling for r, _ in rows] + [SamplingParams(temperature=0.0)] * (b - n)
    seeds = [s.seed if s.seed is not None else int(self._seeds.integers(2**31)) for s in sp]
    keys = np.stack([np.asarray(jax.random.PRNGKey(s)) for s in seeds])
    max_new = np.asarray([m for _, m in rows] + [0] * (b - n), np.int32)
    return _RowParams(
      jnp.asarray([s.temperature for s in sp], jnp.float32),
      jnp.asarray([s.top_p for s in sp], jnp.float32),
      jnp.asarray([s.top_k for s in sp], jnp.int32),
      jnp.asarray(keys),
      jnp.asarray(max_new),
      jnp.asarray(stop_ids),
    )

  # ---- weights -----------------------------------------------------------------------------------

  def _convert_params(self, params: Any) -> Any:
    if isinstance(params, nnx.Module):
      params = nnx.state(params)
    current = self._params
    if isinstance(params, dict) and not isinstance(params, nnx.State):
      new = jax.tree.map(lambda x: x, current)
      nnx.replace_by_pure_dict(new, params)
      params = new
    old_struct = jax.tree.structure(current)
    if jax.tree.structure(params) != old_struct:
      raise ValueError(
        "update_weights: the parameter tree does not match the engine's model "
        f"(expected {old_struct.num_leaves} arrays with the model's layout)"
      )

    def place(old, new):
      new = jnp.asarray(new)
      if new.shape != old.shape:
        raise ValueError(f"update_weights: a parameter has shape {new.shape}, the model expects {old.shape}")
      return jax.device_put(new.astype(old.dtype), old.sharding)

    return jax.tree.map(place, current, params)
