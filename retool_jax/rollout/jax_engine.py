"""The embedded engine: KV-cache generation with the policy's own weights, in process.

    engine = JaxEngine(model, tokenizer=tokenizer)
    [result] = await engine.generate([GenerateRequest(prompt_ids, SamplingParams(temperature=1.0, stop=("</code>",)))])
    await engine.update_weights(nnx.state(trained_model), version=step)

Continuous batching (the default): a fixed number of decode slots (`max_batch_size`, or what `kv_cache_gib`
holds at `max_length` tokens each), each with its own length, position, sampling parameters and PRNG key. A
scheduler admits queued requests into free slots between decode chunks of `decode_chunk` steps, prefills them
in packed chunks (power-of-two token buckets, so few programs compile), and returns each row the moment it
ends (stop token, stop string, budget, `abort`, deadline). A finished request's KV stays in its slot, and
moves to a pool of kept prefixes beyond the slots (`prefix_pool` rows) when the slot is given to another
request, so the next turn of a trajectory prefills only its new tokens even after its slot was reused, and the
samples of a GRPO group share their prompt's prefill (`engine.stats`: prefix hits, misses, evictions, pool
parks and hits, reused tokens). A token's noise
depends only on its request's seed and its index, so a seeded request gives the same tokens whichever
requests share its slots and whether its prefix was reused.

New weights (`update_weights`) serve every request admitted after they arrive; a request already running
finishes on the weights it started with, unless it follows updates (`GenerateRequest.follow_updates`: it goes
on with the new weights at its next decode chunk, its KV kept). The engine holds the newest `keep_versions`
versions (and any that a running or queued request still uses), so requests may also pin one of them
(`GenerateRequest.weight_version`): the trajectories of an asynchronous RL run can finish on the weights they
started with while new ones start on newer weights. Kept prefixes of a version the engine no longer holds are
dropped. Every result records the version of each token (`GenerateResult.output_versions`).

`batching="static"` keeps the previous engine: requests gathered for `batch_window_s` run as one left-padded
batch until its longest row ends (the baseline of `bench/rollout_tail.py`).

The device work runs in a worker thread, so the event loop keeps serving tool calls while the model decodes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retool_jax.models.attention import resolve_impl
from retool_jax.models.layers import Attention
from retool_jax.models.qwen3 import Qwen3
from retool_jax.rollout.slot_scheduler import Job, SlotScheduler, Weights
from retool_jax.rollout.static_batch import StaticBatcher
from retool_jax.rollout.types import FinishReason, GenerateRequest, GenerateResult

__all__ = ["JaxEngine", "with_attention"]

BATCHING = ("continuous", "static")
DEFAULT_POOL_GIB = 0.25  # the kept-prefix pool without a KV budget
MAX_POOL_PER_SLOT = 4  # pool rows per decode slot, at most (when sized from memory)
MAX_ADMISSION_WINDOWS = 20  # an idle engine gathers arrivals for at most this many admission windows


def pool_rows(bytes_per_row: int, slots: int, kv_cache_gib: float | None) -> int:
  """Kept-prefix pool rows from memory: what `kv_cache_gib` holds beyond the slots (`DEFAULT_POOL_GIB` without
  a budget), at most `MAX_POOL_PER_SLOT` per slot."""
  budget = DEFAULT_POOL_GIB * 2**30 if kv_cache_gib is None else kv_cache_gib * 2**30 - slots * bytes_per_row
  return int(max(0, min(MAX_POOL_PER_SLOT * slots, budget // bytes_per_row)))


@dataclasses.dataclass
class _Pending:
  request: GenerateRequest
  future: asyncio.Future
  seed: int
  submitted: float
  listener: Any = None  # called with (ids, logprobs) as a running request's tokens come (continuous batching)


def _mesh_of(params) -> Any:
  for leaf in jax.tree.leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
      return sharding.mesh
  return None


@functools.partial(jax.jit, static_argnames=("graphdef", "k"))
def _top_logprobs(graphdef, params, ids_1T: jax.Array, temperature: jax.Array, k: int):
  logits_TV = nnx.merge(graphdef, params)(ids_1T)[0]
  return jax.lax.top_k(jax.nn.log_softmax(logits_TV / temperature, axis=-1), k)


def with_attention(model: Qwen3, impl: str | None) -> Qwen3:
  """The model (sharing its arrays) with every attention layer on `impl`."""
  if impl is None:
    return model
  resolve_impl(impl)
  graphdef, params = nnx.split(model)
  model = nnx.merge(graphdef, params)
  for _, module in nnx.iter_graph(model):
    if isinstance(module, Attention):
      module.attention_impl = impl
  return model


class JaxEngine:
  """Generation with an in-process Qwen3 (see the module docstring).

  Args:
    model: the policy (its weights are copied out; later changes reach the engine through `update_weights`).
    tokenizer: needed for stop strings (decoding between chunks).
    eos_token_ids: stop tokens added to every request (default: the model config's EOS).
    max_length: longest prompt + generation; longer requests are cut to fit (finish `length`).
    max_batch_size: decode slots (static batching: rows per batch).
    decode_chunk: decode steps per jitted call (stop strings, aborts and admissions happen between calls).
    batching: "continuous" (slots) or "static" (the previous batcher).
    kv_cache_gib: KV memory budget; the slots are as many as it holds at `max_length` tokens each (at most
      `max_batch_size`). None: `max_batch_size` slots, their length growing by powers of two with the requests.
    prefix_pool: rows of the kept-prefix pool (as long as the slots). None: what `kv_cache_gib` holds beyond
      the slots at `max_length` tokens a row (without a budget: `DEFAULT_POOL_GIB`), at most
      `MAX_POOL_PER_SLOT` per slot. 0: a prefix lives only as long as its slot is not reused.
    prefill_chunk: most prompt tokens of one request per prefill call (longer prompts take several calls,
      with decode chunks in between).
    max_prefill_tokens / max_prefill_rows: most tokens / requests packed into one prefill call.
    max_stop_ids: most stop token ids per request (EOS included).
    batch_window_s: static batching only: how long the batcher waits for more requests before a batch.
    admission_window_s: continuous batching: an idle engine that got a request waits for more while they come
      less than this apart (a server's clients send theirs a few milliseconds apart), so they share a prefill;
      0: it starts at once.
    min_batch_bucket / min_prompt_bucket / min_new_bucket: smallest padded batch / prompt (prefill) length /
      new-token budget (larger minimums: fewer programs to compile, more padding).
    min_attend_bucket / min_slot_length: smallest bucket of the cache columns a call attends to / of the slot
      length (slots grow by powers of two up to `max_length`).
    attention_impl: attention over the cache ("blockwise": online softmax, no `[B, N, T, S]` scores, decode
      reads only the written prefix); None keeps the model config's.
    seed: draws the seeds of requests without one (in submission order).
    weight_version: the label of the model's weights.
    keep_versions: weight versions held for requests that pin one (the newest ones; versions a queued or
      running request uses are held too).
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
    batching: str = "continuous",
    kv_cache_gib: float | None = None,
    prefix_pool: int | None = None,
    prefill_chunk: int = 512,
    max_prefill_tokens: int = 2048,
    max_prefill_rows: int = 16,
    max_stop_ids: int = 8,
    batch_window_s: float = 0.005,
    admission_window_s: float = 0.0,
    min_batch_bucket: int = 1,
    min_prompt_bucket: int = 16,
    min_new_bucket: int = 16,
    min_attend_bucket: int = 128,
    min_slot_length: int = 256,
    attention_impl: str | None = "blockwise",
    pad_id: int = 0,
    seed: int = 0,
    weight_version: int | str | None = 0,
    keep_versions: int = 1,
  ):
    if max_batch_size < 1 or decode_chunk < 1:
      raise ValueError(f"max_batch_size={max_batch_size} and decode_chunk={decode_chunk} must be >= 1")
    if batching not in BATCHING:
      raise ValueError(f"batching={batching!r} must be one of {BATCHING}")
    if keep_versions < 1:
      raise ValueError(f"keep_versions={keep_versions} must be >= 1")
    if min(prefill_chunk, max_prefill_tokens, max_prefill_rows, max_stop_ids) < 1:
      raise ValueError(
        f"prefill_chunk={prefill_chunk}, max_prefill_tokens={max_prefill_tokens}, "
        f"max_prefill_rows={max_prefill_rows} and max_stop_ids={max_stop_ids} must be >= 1"
      )
    self._graphdef, params = nnx.split(with_attention(model, attention_impl))
    # Committed arrays, like the ones `update_weights` places, so that a swap reuses the compiled programs.
    params = jax.tree.map(lambda a: jax.device_put(a, a.sharding), params)
    self._gen = 0  # generation of the newest weights; `_weights[gen] = (params, version label)`
    self._weights: dict[int, tuple[Any, Any]] = {0: (params, weight_version)}
    self.keep_versions = keep_versions
    self.config = model.config
    self.tokenizer = tokenizer
    if eos_token_ids is None:
      eos_token_ids = () if model.config.eos_token_id is None else (model.config.eos_token_id,)
    self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
    self.max_length = int(max_length or model.config.max_position_embeddings)
    self.batching = batching
    self.max_batch_size = max_batch_size
    self.decode_chunk = decode_chunk
    self.batch_window_s = batch_window_s
    self.admission_window_s = admission_window_s
    self.min_batch_bucket = min(min_batch_bucket, max_batch_size)
    self.min_prompt_bucket = min_prompt_bucket
    self.min_new_bucket = min_new_bucket
    self.min_attend_bucket = min_attend_bucket
    self.min_slot_length = min_slot_length
    self.prefill_chunk = prefill_chunk
    self.max_prefill_tokens = max(max_prefill_tokens, prefill_chunk)
    self.max_prefill_rows = max_prefill_rows
    self.max_stop_ids = max_stop_ids
    self.pad_id = pad_id
    self.weight_version = weight_version
    self.layer_counts = {k: n for k in ("dense", "moe") if (n := sum(1 for kk, _ in model.layer_plan if kk == k))}
    self.cache_dtype = model.config.jnp_dtype
    self.num_slots = self._slots_for_budget(kv_cache_gib)
    if prefix_pool is not None and prefix_pool < 0:
      raise ValueError(f"prefix_pool={prefix_pool} must be >= 0")
    per_row = self.kv_bytes_per_token() * self.max_length
    self.prefix_pool = pool_rows(per_row, self.num_slots, kv_cache_gib) if prefix_pool is None else prefix_pool
    self._seeds = np.random.default_rng(seed)
    self._queue: asyncio.Queue[_Pending] | None = None
    self._loop: asyncio.AbstractEventLoop | None = None
    self._worker: asyncio.Task | None = None
    self._device_lock = threading.Lock()
    self._static = StaticBatcher(self)
    self.programs: set[tuple] = set()  # static batching: the shapes compiled
    self._scheduler = SlotScheduler(
      self, self.num_slots, max_stop_ids, mesh=_mesh_of(self._params), pool=self.prefix_pool
    )
    self.stats: dict[str, int] = dict.fromkeys(
      ("batches", "rows", "generated_tokens", "decode_chunks", "decode_steps", "slot_steps", "useful_tokens")
      + ("prefill_calls", "prefill_tokens", "prefill_padded_tokens", "reused_tokens")
      + ("prefix_hits", "prefix_misses", "evictions", "pool_parks", "pool_hits", "compiled_programs"),
      0,
    )

  @property
  def _params(self) -> Any:
    """The newest weights."""
    return self._weights[self._gen][0]

  def held_versions(self) -> list[Any]:
    """Labels of the weight versions the engine holds, oldest first."""
    with self._device_lock:
      return [label for _, label in self._weights.values()]

  def kv_bytes_per_token(self) -> int:
    cfg = self.config
    per_layer = cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(self.cache_dtype).itemsize
    return 2 * sum(self.layer_counts.values()) * per_layer

  def _slots_for_budget(self, kv_cache_gib: float | None) -> int:
    if kv_cache_gib is None:
      return self.max_batch_size
    per_slot = self.kv_bytes_per_token() * self.max_length
    slots = min(self.max_batch_size, int(kv_cache_gib * 2**30 // per_slot))
    if slots < 1:
      raise ValueError(
        f"kv_cache_gib={kv_cache_gib} holds no slot of max_length={self.max_length} tokens "
        f"({per_slot / 2**30:.3f} GiB each)"
      )
    return slots

  # ---- Engine protocol ---------------------------------------------------------------------------

  async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
    """Generates for every request; concurrent calls share the slots (or batches). Results are in order."""
    for i, r in enumerate(requests):
      self._check(i, r)
    if not requests:
      return []
    queue = self._ensure_worker()
    loop = asyncio.get_running_loop()
    now = time.monotonic()
    pending = [_Pending(r, loop.create_future(), self._seed_of(r), now) for r in requests]
    for p in pending:
      queue.put_nowait(p)
    return list(await asyncio.gather(*(p.future for p in pending)))

  async def generate_stream(
    self, request: GenerateRequest
  ) -> AsyncIterator[tuple[list[int], list[float]] | GenerateResult]:
    """Generates for one request, yielding `(ids, logprobs)` of its new tokens after every decode chunk (the
    tokens are final: a chunk's tokens past a stop are never yielded), then its `GenerateResult`. With static
    batching the tokens come all at once at the end."""
    self._check(0, request)
    queue = self._ensure_worker()
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()
    p = _Pending(request, loop.create_future(), self._seed_of(request), time.monotonic(), deltas.put_nowait)
    p.future.add_done_callback(lambda _: deltas.put_nowait(None))
    queue.put_nowait(p)
    sent = 0
    while (delta := await deltas.get()) is not None:
      sent += len(delta[0])
      yield delta
    result = p.future.result()
    if len(result.output_ids) > sent:
      yield result.output_ids[sent:], result.output_logprobs[sent:]
    yield result

  def abort(self, request_id: str) -> None:
    """Ends the request with this id: it returns what it generated so far, finish reason `abort`.

    Continuous batching only (a static batch runs to its end).
    """
    self._scheduler.abort(request_id)

  async def update_weights(self, params: Any, version: int | str | None = None) -> None:
    """Adds new weights (a `Qwen3`, an `nnx.State` or a nested dict of arrays with the model's layout), placed
    on the engine's devices (a resharding copy from wherever they are).

    They serve every request admitted from now on, and the requests that follow updates from their next chunk;
    requests already running finish with the weights they started with. Older versions stay while a request
    uses them or they are among the newest `keep_versions`. Matching shapes and dtypes reuse the compiled
    programs.
    """
    new = await asyncio.to_thread(self._convert_params, params)
    with self._device_lock:
      self._gen += 1
      if self.batching == "static":
        self._weights = {}
      self._weights[self._gen] = (new, version)
      self.weight_version = version

  async def top_logprobs(
    self, ids: Sequence[int], start: int, k: int, temperature: float = 1.0
  ) -> list[list[tuple[int, float]]]:
    """The `k` likeliest next tokens and their log-probs (under `log_softmax(logits / temperature)`, as the
    sampled tokens' log-probs) at each of `ids[start:]`, given what precedes it, by one forward pass on the
    newest weights. The sequence is padded to a power of two (at least `min_attend_bucket`) to bound the
    programs compiled."""
    if not 1 <= start <= len(ids) or k < 1:
      raise ValueError(f"start={start} must be in [1, {len(ids)}] and k={k} >= 1")
    length = max(self.min_attend_bucket, 1 << (len(ids) - 1).bit_length())
    row = np.full((1, length), self.pad_id, np.int32)
    row[0, : len(ids)] = ids
    t = 1.0 if temperature <= 0 else float(temperature)

    def run():
      with self._device_lock:
        params = self._params
      values, indices = _top_logprobs(
        self._graphdef, params, jnp.asarray(row), jnp.float32(t), min(k, self.config.vocab_size)
      )
      values, indices = jax.device_get((values, indices))
      return [[(int(i), float(v)) for i, v in zip(indices[p], values[p])] for p in range(start - 1, len(ids) - 1)]

    return await asyncio.to_thread(run)

  async def health(self) -> bool:
    worker = self._worker
    return worker is None or not worker.done() or worker.cancelled()

  async def close(self) -> None:
    """Stops the scheduler on the running loop; requests still queued or running fail with `CancelledError`.

    The engine stays usable: the next `generate` starts a new scheduler.
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
    for job in self._scheduler.cancel_all():
      if not job.handle.done():
        job.handle.cancel()

  # ---- serving -----------------------------------------------------------------------------------

  def _seed_of(self, r: GenerateRequest) -> int:
    s = r.sampling.seed
    return int(s) if s is not None else int(self._seeds.integers(2**31))

  def _ensure_worker(self) -> asyncio.Queue:
    loop = asyncio.get_running_loop()
    if self._loop is not loop or self._worker is None or self._worker.done():
      self._loop, self._queue = loop, asyncio.Queue()
      serve = self._serve_static if self.batching == "static" else self._serve_slots
      self._worker = loop.create_task(serve(self._queue))
    return self._queue

  async def _serve_slots(self, queue: asyncio.Queue) -> None:
    sched = self._scheduler
    while True:
      if not sched.busy():
        self._take(await queue.get())
        await self._gather_arrivals(queue)
      while not queue.empty():
        self._take(queue.get_nowait())
      try:
        finished = await asyncio.to_thread(self._slot_step)
      except Exception as e:  # noqa: BLE001  (a failed step fails its callers, not the server)
        for job in sched.cancel_all():
          if not job.handle.done():
            job.handle.set_exception(e)
        continue
      for job, result in finished:
        if not job.handle.done():
          job.handle.set_result(result)
      for slot in sched.slots:
        job = slot.job
        if job is not None and job.listener is not None and len(job.out) > job.streamed:
          job.listener((job.out[job.streamed :], job.lps[job.streamed :]))
          job.streamed = len(job.out)

  async def _gather_arrivals(self, queue: asyncio.Queue) -> None:
    """On an idle engine, keeps taking requests while they arrive less than `admission_window_s` apart (for at
    most `MAX_ADMISSION_WINDOWS` windows), so that requests a server's clients send together start in one
    prefill."""
    if self.admission_window_s <= 0:
      return
    loop = asyncio.get_running_loop()
    end = loop.time() + MAX_ADMISSION_WINDOWS * self.admission_window_s
    while (left := min(self.admission_window_s, end - loop.time())) > 0:
      try:
        self._take(await asyncio.wait_for(queue.get(), left))
      except TimeoutError:
        return

  def _take(self, p: _Pending) -> None:
    if p.future.done():
      return
    r = p.request
    room = self.max_length - len(r.prompt_ids)
    if room < 1:
      message = f"prompt of {len(r.prompt_ids)} tokens leaves no room within max_length={self.max_length}"
      p.future.set_result(GenerateResult([], [], FinishReason("abort", message=message), self.weight_version))
      return
    gen = None
    if r.weight_version is not None:
      with self._device_lock:
        gen = max((g for g, (_, label) in self._weights.items() if label == r.weight_version), default=None)
        held = [label for _, label in self._weights.values()]
      if gen is None:
        message = f"weight version {r.weight_version!r} is not held (the engine holds {held})"
        p.future.set_result(GenerateResult([], [], FinishReason("abort", message=message), r.weight_version))
        return
    deadline = None if r.deadline_s is None else p.submitted + r.deadline_s
    budget = min(r.sampling.max_new_tokens, room)
    job = Job(r, p.future, p.seed, budget, deadline)
    job.gen, job.listener = gen, p.listener
    self._scheduler.submit(job)

  def _slot_step(self) -> list:
    sched = self._scheduler
    with self._device_lock:
      held = set(sorted(self._weights)[-self.keep_versions :]) | sched.used_gens() | {self._gen}
      released = {g for g in self._weights if g not in held}
      for g in released:
        del self._weights[g]
      weights = Weights(
        {g: w for g, (w, _) in self._weights.items()},
        {g: label for g, (_, label) in self._weights.items()},
        self._gen,
      )
    if released:
      sched.drop_prefixes(released)
    finished = sched.step(self._graphdef, weights)
    self.stats["compiled_programs"] = len(sched.programs)
    return finished

  async def _serve_static(self, queue: asyncio.Queue) -> None:
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
        results = await asyncio.to_thread(self._run_batch, [(p.request, p.seed) for p in batch])
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
    n_stop = len(set(self.eos_token_ids) | set(r.sampling.stop_token_ids))
    if n_stop > self.max_stop_ids:
      raise ValueError(
        f"requests[{i}] has {n_stop} stop token ids (EOS included), more than max_stop_ids={self.max_stop_ids}"
      )
    if r.deadline_s is not None and r.deadline_s < 0:
      raise ValueError(f"requests[{i}].deadline_s={r.deadline_s} must be >= 0")
    if r.sampling.stop and self.tokenizer is None:
      raise ValueError(
        f"requests[{i}].sampling.stop={r.sampling.stop!r} needs a tokenizer: JaxEngine(model, tokenizer=...)"
      )

  def stop_ids(self, r: GenerateRequest) -> list[int]:
    return sorted(set(self.eos_token_ids) | set(r.sampling.stop_token_ids))

  # ---- static batching ---------------------------------------------------------------------------

  def _run_batch(self, rows: list[tuple[GenerateRequest, int]]) -> list[GenerateResult]:
    with self._device_lock:
      graphdef, params, version = self._graphdef, self._params, self.weight_version
    results: list[GenerateResult | None] = [None] * len(rows)
    live = []
    for i, (r, seed) in enumerate(rows):
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
        live.append((i, (r, min(r.sampling.max_new_tokens, room), seed)))
    if live:
      for (i, _), res in zip(live, self._static.decode(graphdef, params, [row for _, row in live])):
        res.weight_version = version
        results[i] = res
    self.stats["compiled_programs"] = len(self.programs)
    return results  # type: ignore[return-value]

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
      # several versions held: each owns its buffers, so a trainer that donates its own cannot delete them
      return jax.device_put(
        new.astype(old.dtype), old.sharding, may_alias=None if self.keep_versions == 1 else False
      )

    return jax.tree.map(place, current, params)
