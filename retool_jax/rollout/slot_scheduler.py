"""Host side of the slot engine: which slot holds what, admission, prefix reuse, finishing rows.

Every slot holds the KV of a token list (`Slot.tokens`, columns `0 .. len - 1`). A slot is free, decoding
one request, or prefilling one (its prompt goes in by chunks of at most `prefill_chunk` tokens, several rows
packed into one call). A finished request leaves its prompt and output in the slot, so a later request that
extends them (the next turn of a trajectory, the continuation of an aborted row) prefills only what is new;
a request whose prompt another slot already holds (the samples of one GRPO group) copies that slot's prefix.
When a free slot holding a kept prefix is given to another request, the prefix is parked in the pool (rows
beyond the slots that decode never runs over); a request that extends a parked prefix gets it copied back into
its slot and prefills only the rest. The pool overwrites its least recently used prefix when full; everything
kept under weights that are no longer held is dropped.

Weight versions. The engine may hold several versions of the weights at once (`Weights`, keyed by a
generation number): a request runs on the newest at its admission to the end, on the version it pins, or, if it
follows updates, on the newest at every call (its KV is kept: a partial rollout). Decode and prefill calls run
one version each; every generated token records the version that produced it. A kept prefix is reused only by
a request on the same version (a request that follows updates also reuses other such requests' prefixes).

`step()` is one scheduler iteration: finish aborted / timed-out rows, admit queued requests into free slots,
park and restore prefixes (one copy call), run one packed prefill call, run one decode chunk over every decoding
slot, and return the finished rows.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

import jax
import numpy as np

from retool_jax.rollout import slot_programs as programs
from retool_jax.rollout.sampling import find_stop_string
from retool_jax.rollout.types import FinishReason, GenerateRequest, GenerateResult


def bucket(n: int, minimum: int) -> int:
  return max(minimum, 1 << max(0, n - 1).bit_length())


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
  n = min(len(a), len(b))
  if n == 0:
    return 0
  diff = np.flatnonzero(a[:n] != b[:n])
  return int(diff[0]) if len(diff) else n


@dataclasses.dataclass(frozen=True)
class Weights:
  """The weight versions an engine holds: `params[gen]` and its label `label[gen]`; `latest` is the newest."""

  params: dict[int, Any]
  label: dict[int, Any]
  latest: int


@dataclasses.dataclass
class Job:
  """A request from submission to its result."""

  request: GenerateRequest
  handle: Any  # what the front end resolves with the result (a future)
  seed: int
  budget: int  # tokens it may generate
  deadline: float | None  # time.monotonic() after which it is aborted
  prompt: np.ndarray = dataclasses.field(init=False)
  written: int = 0  # prompt tokens whose KV is in the slot
  source: int = -1  # slot the first prefill copies its prefix from
  out: list[int] = dataclasses.field(default_factory=list)
  lps: list[float] = dataclasses.field(default_factory=list)
  checked: int = 0  # output tokens already searched for stop strings
  stop_hit: tuple[int, str] | None = None
  version: Any = None  # the label of the version it started on
  admitted_at: float = 0.0
  gen: int | None = None  # the weights it runs on (None: the newest at admission)
  versions: list[Any] = dataclasses.field(default_factory=list)  # the version label of every output token
  listener: Any = None  # told (ids, logprobs) of new output tokens after each step (the engine's streams)
  streamed: int = 0  # output tokens already told

  def __post_init__(self):
    self.prompt = np.asarray(self.request.prompt_ids, np.int32)

  @property
  def follow(self) -> bool:
    return self.request.follow_updates


@dataclasses.dataclass
class Slot:
  tokens: np.ndarray  # tokens whose KV the slot holds
  job: Job | None = None
  decoding: bool = False
  last_used: int = 0
  gen: int = -1  # the weights its KV was computed with (the newest of them, for a request following updates)
  follow: bool = False  # written by a request that follows updates

  def reusable_by(self, job: Job) -> bool:
    return self.gen == job.gen or (job.follow and self.follow)


class SlotScheduler:
  """Slots on the device plus their bookkeeping; see the module docstring. Not thread-safe: one caller."""

  def __init__(self, engine, slots: int, stop_width: int, mesh=None, pool: int = 0):
    self.engine = engine
    self.num_slots = slots
    self.stop_width = stop_width
    self.mesh = mesh
    self.slots = [Slot(np.zeros((0,), np.int32)) for _ in range(slots)]
    self.pool = [Slot(np.zeros((0,), np.int32)) for _ in range(pool)]  # kept prefixes (never with a job)
    self.parks: list[tuple[int, int]] = []  # (slot, pool row) copies due before the next prefill
    self.restores: list[tuple[int, int, int]] = []  # (pool row, slot, tokens) copies due after the parks
    self.waiting: collections.deque[Job] = collections.deque()
    self.state: programs.SlotState | None = None
    self.length = 0  # columns per slot
    self.tick = 0
    self.aborted: set[str] = set()
    self.programs: set[tuple] = set()

  # ---- queue ---------------------------------------------------------------------------------------

  def submit(self, job: Job) -> None:
    self.waiting.append(job)

  def busy(self) -> bool:
    return bool(self.waiting) or any(s.job is not None for s in self.slots)

  def abort(self, request_id: str) -> None:
    self.aborted.add(request_id)

  def drop_prefixes(self, gens: set[int]) -> None:
    """Forgets the kept prefixes computed with the weights of `gens` (versions the engine no longer holds)."""
    for s in self.slots + self.pool:
      if s.job is None and s.gen in gens:
        s.tokens = s.tokens[:0]

  def used_gens(self) -> set[int]:
    """The weight versions queued and running requests still need (those following updates need the newest)."""
    jobs = list(self.waiting) + [s.job for s in self.slots if s.job is not None]
    return {j.gen for j in jobs if j.gen is not None and not j.follow}

  def cancel_all(self) -> list[Job]:
    jobs = list(self.waiting) + [s.job for s in self.slots if s.job is not None]
    self.waiting.clear()
    self.parks.clear()
    self.restores.clear()
    for s in self.slots + self.pool:
      s.job, s.decoding, s.tokens = None, False, s.tokens[:0]
    return jobs

  # ---- one iteration -------------------------------------------------------------------------------

  def step(self, graphdef, weights: Weights, admit: bool = True) -> list[tuple[Job, GenerateResult]]:
    done: list[tuple[Job, GenerateResult]] = []
    self._expire(done)
    for s in self.slots:
      if s.job is not None and s.job.follow:
        s.job.gen = weights.latest
    if admit:
      self._admit(weights, done)
    self._move()
    self._prefill(graphdef, weights, done)
    self._decode(graphdef, weights, done)
    return done

  def _expire(self, done) -> None:
    now = time.monotonic()
    hit = lambda j: (
      (j.request.request_id is not None and j.request.request_id in self.aborted)
      or (j.deadline is not None and now >= j.deadline)
    )
    for j in [j for j in self.waiting if hit(j)]:
      self.waiting.remove(j)
      done.append((j, self._result(j, FinishReason("abort", message=self._why(j)))))
    for i, s in enumerate(self.slots):
      if s.job is not None and hit(s.job):
        done.append((s.job, self._finish(i, FinishReason("abort", message=self._why(s.job)))))
    live = {j.request.request_id for j in self.waiting} | {s.job.request.request_id for s in self.slots if s.job}
    self.aborted &= live  # an abort for a request not (yet) here is forgotten

  def _why(self, job: Job) -> str:
    if job.request.request_id in self.aborted:
      return f"aborted: request {job.request.request_id!r}"
    return f"deadline of {job.request.deadline_s}s passed"

  # ---- admission -----------------------------------------------------------------------------------

  def _admit(self, weights: Weights, done) -> None:
    deferred = []
    while self.waiting:
      job = self.waiting.popleft()
      free = [i for i, s in enumerate(self.slots) if s.job is None]
      if not free:
        self.waiting.appendleft(job)
        break
      if job.gen is None or job.follow:
        job.gen = weights.latest
      if self._wait_for_shared_prefix(job):
        deferred.append(job)
        continue
      self._ensure_length(len(job.prompt) + job.budget)
      dst, source, reuse = self._place(job, free)
      slot = self.slots[dst]
      self.engine.stats["prefix_hits" if reuse else "prefix_misses"] += 1
      self.engine.stats["reused_tokens"] += reuse
      job.written, job.source, job.version = reuse, source, weights.label[job.gen]
      job.admitted_at = time.monotonic()
      slot.job, slot.decoding = job, False
      slot.tokens = slot.tokens[:reuse] if source == dst else slot.tokens[:0]  # what the device holds now
      slot.gen, slot.follow = job.gen, job.follow
      self.tick += 1
      slot.last_used = self.tick
      self.slots[source].last_used = self.tick
    self.waiting.extendleft(reversed(deferred))

  def _wait_for_shared_prefix(self, job: Job) -> bool:
    """True when a slot now prefilling will soon hold a longer prefix of this prompt than any slot holds now
    (the other samples of a group wait for the first one's prefill instead of repeating it)."""
    held = max(
      (common_prefix(s.tokens, job.prompt) for s in self.slots + self.pool if s.reusable_by(job)), default=0
    )
    for s in self.slots:
      if s.job is not None and not s.decoding and (s.job.gen == job.gen or job.follow and s.job.follow):
        coming = min(common_prefix(s.job.prompt, job.prompt), len(job.prompt) - 1)
        if coming >= max(held + 16, 2 * held):
          return True
    return False

  def _place(self, job: Job, free: list[int]) -> tuple[int, int, int]:
    """(destination slot, source slot, prefix tokens reused); schedules the pool copies this needs."""
    limit = len(job.prompt) - 1
    match = lambda s: min(common_prefix(s.tokens, job.prompt), limit) if s.reusable_by(job) else 0
    held = [(match(s), s.job is None, -i) for i, s in enumerate(self.slots)]
    reuse, _, best = max(held)
    best = -best
    restoring = {p for p, _, _ in self.restores}
    pooled = [(match(r), -p) for p, r in enumerate(self.pool)]
    pool_reuse, pool_best = max((c for c in pooled if -c[1] not in restoring), default=(0, 0))
    if pool_reuse > reuse:  # copy the parked prefix back into a free slot
      self.restores.append((-pool_best, -1, pool_reuse))  # reserved: parking cannot pick this row
      dst = self._free_slot(free)
      row = self.pool[-pool_best]
      self.restores[-1] = (-pool_best, dst, pool_reuse)
      self.slots[dst].tokens = row.tokens[:pool_reuse]
      self.slots[dst].gen, self.slots[dst].follow = row.gen, row.follow
      if pool_reuse == len(row.tokens):  # the slot will hold an extension: the row is free again
        row.tokens = row.tokens[:0]
      self.engine.stats["pool_hits"] += 1
      return dst, dst, pool_reuse
    if reuse > 0 and self.slots[best].job is None:
      if self.pool and reuse < len(self.slots[best].tokens):  # keep what only shares a head with this prompt
        self._park(best)
      return best, best, reuse  # continue in place
    dst = self._free_slot(free)
    return (dst, best, reuse) if reuse > 0 else (dst, dst, 0)

  def _free_slot(self, free: list[int]) -> int:
    """An empty free slot, else the one whose kept prefix was used least recently (parked in the pool)."""
    dst = min(free, key=lambda i: (len(self.slots[i].tokens) > 0, self.slots[i].last_used))
    slot = self.slots[dst]
    if len(slot.tokens):
      self._park(dst)
    slot.tokens = slot.tokens[:0]
    return dst

  def _park(self, i: int) -> None:
    """Copies slot i's kept prefix into the pool: over a pooled prefix it extends, else into an empty row, else
    over the least recently used one (an eviction)."""
    slot = self.slots[i]
    n = len(slot.tokens)
    restoring = {p for p, _, _ in self.restores}
    candidates = [p for p in range(len(self.pool)) if p not in restoring]
    same = [p for p in candidates if (self.pool[p].gen, self.pool[p].follow) == (slot.gen, slot.follow)]
    if any(common_prefix(self.pool[p].tokens, slot.tokens) == n for p in same):
      return  # the pool already holds it (or an extension)
    if not candidates:
      self.engine.stats["evictions"] += 1
      return
    free = lambda p: (
      not len(self.pool[p].tokens)
      or (p in same and common_prefix(self.pool[p].tokens, slot.tokens) == len(self.pool[p].tokens))
    )  # empty, or a prefix of what it parks
    p = min(candidates, key=lambda p: (not free(p), self.pool[p].last_used))
    if not free(p):
      self.engine.stats["evictions"] += 1
    self.parks.append((i, p))
    row = self.pool[p]
    row.tokens, row.last_used, row.gen, row.follow = slot.tokens, slot.last_used, slot.gen, slot.follow
    self.engine.stats["pool_parks"] += 1

  def _move(self) -> None:
    """Runs the parks and restores admission scheduled (one call; row counts bucketed)."""
    if not (self.parks or self.restores):
      return
    n = bucket(max(len(self.parks), len(self.restores)), 1)
    b, p = self.num_slots, len(self.pool)
    park_slot, park_pool = np.full((n,), b, np.int32), np.full((n,), p, np.int32)
    restore_pool, restore_slot = np.full((n,), p, np.int32), np.full((n,), b, np.int32)
    restore_len = np.zeros((n,), np.int32)
    for k, (i, q) in enumerate(self.parks):
      park_slot[k], park_pool[k] = i, q
    for k, (q, i, m) in enumerate(self.restores):
      restore_pool[k], restore_slot[k], restore_len[k] = q, i, m
    self.programs.add(("move", n, self.length))
    self.state = programs.move_rows(self.state, park_slot, park_pool, restore_pool, restore_slot, restore_len)
    self.parks.clear()
    self.restores.clear()

  def _ensure_length(self, need: int) -> None:
    need = min(need, self.engine.max_length)
    if self.state is None:
      self.length = min(bucket(need, self.engine.min_slot_length), self.engine.max_length)
      cfg = self.engine.config
      self.state = programs.init_state(
        self.engine.layer_counts,
        self.num_slots,
        self.length,
        cfg.num_key_value_heads,
        cfg.head_dim,
        self.engine.cache_dtype,
        self.stop_width,
        self.mesh,
        pool=len(self.pool),
      )
    elif need > self.length:
      new = min(bucket(need, self.engine.min_slot_length), self.engine.max_length)
      self.programs.add(("grow", self.length, new))
      self.state = programs.grow(self.state, length=new)
      self.length = new

  # ---- prefill -------------------------------------------------------------------------------------

  def _prefill(self, graphdef, weights: Weights, done) -> None:
    eng = self.engine
    rows = [i for i, s in enumerate(self.slots) if s.job is not None and not s.decoding]
    if not rows:
      return
    rows.sort(key=lambda i: self.slots[i].job.admitted_at)
    gen = self.slots[rows[0]].job.gen  # one weight version per call: the oldest admission's
    rows = [i for i in rows if self.slots[i].job.gen == gen]
    chosen, tokens = [], 0
    for i in rows:
      job = self.slots[i].job
      if job.source >= 0 and job.source != i:  # the shared prefix may have been overwritten since admission
        source = self.slots[job.source]
        held = min(common_prefix(source.tokens, job.prompt), len(job.prompt) - 1) if source.reusable_by(job) else 0
        if held < job.written:
          job.written, job.source = held, (job.source if held else i)
      n = min(len(job.prompt) - job.written, eng.prefill_chunk)
      if chosen and (tokens + n > eng.max_prefill_tokens or len(chosen) >= eng.max_prefill_rows):
        break
      chosen.append((i, n))
      tokens += n
    r = min(bucket(len(chosen), 1), bucket(eng.max_prefill_rows, 1))
    t = bucket(max(n for _, n in chosen), eng.min_prompt_bucket)
    attend = min(bucket(max(self.slots[i].job.written + t for i, _ in chosen), eng.min_attend_bucket), self.length)
    b, w = self.num_slots, self.stop_width
    slot_R = np.full((r,), b, np.int32)
    source_R = np.zeros((r,), np.int32)
    start_R = np.zeros((r,), np.int32)
    ids_RT = np.full((r, t), eng.pad_id, np.int32)
    n_R = np.zeros((r,), np.int32)
    last_R = np.zeros((r,), bool)
    temp_R = np.zeros((r,), np.float32)
    top_p_R = np.ones((r,), np.float32)
    top_k_R = np.full((r,), -1, np.int32)
    keys_R2 = np.zeros((r, 2), np.uint32)
    max_new_R = np.zeros((r,), np.int32)
    stop_RW = np.full((r, w), -1, np.int32)
    for k, (i, n) in enumerate(chosen):
      job = self.slots[i].job
      sp = job.request.sampling
      slot_R[k] = i
      source_R[k] = job.source if job.source >= 0 else i
      start_R[k] = job.written
      ids_RT[k, :n] = job.prompt[job.written : job.written + n]
      n_R[k] = n
      last_R[k] = job.written + n == len(job.prompt)
      temp_R[k], top_p_R[k], top_k_R[k] = sp.temperature, sp.top_p, sp.top_k
      keys_R2[k] = key_data(job.seed)
      max_new_R[k] = job.budget
      stops = eng.stop_ids(job.request)
      stop_RW[k, : len(stops)] = stops
    rows_dev = programs.PrefillRows(
      slot_R, source_R, start_R, ids_RT, n_R, last_R, temp_R, top_p_R, top_k_R, keys_R2, max_new_R, stop_RW
    )  # host arrays: the call transfers them
    self.programs.add(("prefill", r, t, self.length, attend))
    self.state, first, first_lp = programs.prefill(
      graphdef, weights.params[gen], self.state, rows_dev, attend_length=attend
    )
    first, first_lp = np.asarray(first), np.asarray(first_lp)
    eng.stats["prefill_calls"] += 1
    eng.stats["prefill_tokens"] += int(n_R.sum())
    eng.stats["prefill_padded_tokens"] += r * t
    for k, (i, n) in enumerate(chosen):
      slot, job = self.slots[i], self.slots[i].job
      job.written += n
      job.source = -1
      slot.tokens = job.prompt[: job.written].copy()
      slot.gen = gen
      if not last_R[k]:
        continue
      slot.decoding = True
      job.out.append(int(first[k]))
      job.lps.append(float(first_lp[k]))
      job.versions.append(weights.label[gen])
      reason = self._ended(job, self.length)
      if reason is not None:
        done.append((job, self._finish(i, reason)))

  # ---- decode --------------------------------------------------------------------------------------

  def _decode(self, graphdef, weights: Weights, done) -> None:
    live = [i for i, s in enumerate(self.slots) if s.job is not None and s.decoding]
    keep = np.zeros((self.num_slots,), bool)
    keep[live] = True
    by_gen: dict[int, list[int]] = {}
    for i in live:
      by_gen.setdefault(self.slots[i].job.gen, []).append(i)
    for gen in sorted(by_gen):  # one call per weight version, oldest first
      self._decode_rows(graphdef, weights, gen, by_gen[gen], keep, done)

  def _decode_rows(self, graphdef, weights: Weights, gen: int, rows: list[int], keep: np.ndarray, done) -> None:
    eng = self.engine
    steps = eng.decode_chunk
    longest = max(len(self.slots[i].tokens) + 1 for i in rows)  # + the last token, fed first
    attend = min(bucket(longest + steps, eng.min_attend_bucket), self.length)
    run = np.zeros((self.num_slots,), bool)
    run[rows] = True
    self.programs.add(("decode", self.num_slots, self.length, steps, attend))
    self.state, out, out_lp, new = programs.decode_chunk(
      graphdef, weights.params[gen], self.state, keep, run, steps=steps, attend_length=attend
    )
    out, out_lp, new = np.asarray(out), np.asarray(out_lp), np.asarray(new)
    ran = int(new.max())
    eng.stats["decode_chunks"] += 1
    eng.stats["decode_steps"] += ran
    eng.stats["slot_steps"] += ran * self.num_slots
    eng.stats["useful_tokens"] += int(new.sum())
    for i in rows:
      slot, job = self.slots[i], self.slots[i].job
      n = int(new[i])
      job.out.extend(out[i, :n].tolist())
      job.lps.extend(out_lp[i, :n].astype(float).tolist())
      job.versions.extend([weights.label[gen]] * n)
      slot.tokens = np.concatenate([job.prompt, np.asarray(job.out[:-1], np.int32)])
      slot.gen = gen
      reason = self._ended(job, self.length)
      if reason is not None:
        done.append((job, self._finish(i, reason)))

  def _ended(self, job: Job, length: int) -> FinishReason | None:
    """Why the job's row ends now, or None while it goes on."""
    eng = self.engine
    stops = job.request.sampling.stop
    if stops:
      hit = find_stop_string(job.out, job.checked, stops, eng.tokenizer.decode)
      job.checked = len(job.out)
      if hit is not None:
        del job.out[hit[0] + 1 :], job.lps[hit[0] + 1 :], job.versions[hit[0] + 1 :]
        return FinishReason("stop", hit[1])
    last = job.out[-1]
    if last in eng.eos_token_ids or last in job.request.sampling.stop_token_ids:
      return FinishReason("stop", last)
    if len(job.out) >= job.budget or len(job.prompt) + len(job.out) > length:
      return FinishReason("length")
    return None

  def _finish(self, i: int, reason: FinishReason) -> GenerateResult:
    slot, job = self.slots[i], self.slots[i].job
    fed = max(0, len(job.out) - 1) if slot.decoding else 0
    slot.tokens = np.concatenate([job.prompt[: job.written], np.asarray(job.out[:fed], np.int32)])
    slot.job, slot.decoding = None, False
    self.tick += 1
    slot.last_used = self.tick
    return self._result(job, reason)

  def _result(self, job: Job, reason: FinishReason) -> GenerateResult:
    self.engine.stats["rows"] += 1
    self.engine.stats["generated_tokens"] += len(job.out)
    return GenerateResult(
      list(job.out),
      list(job.lps),
      reason,
      job.version,
      meta={"prompt_tokens": len(job.prompt), "request_id": job.request.request_id},
      output_versions=list(job.versions),
    )


def key_data(seed: int) -> np.ndarray:
  return np.asarray(jax.random.key_data(jax.random.PRNGKey(seed)), np.uint32)
