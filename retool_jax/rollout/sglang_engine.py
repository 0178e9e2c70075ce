"""A generation engine backed by an SGLang server, or an `sglang-router` in front of several.

    engine = SGLangEngine("http://127.0.0.1:30000", model_config=cfg,
                          options=SGLangOptions(sync_dir="/ckpt/sync"))
    await engine.start()                       # waits for /health_generate, checks /get_model_info
    results = await engine.generate(requests)  # token ids + log-probs straight from the server
    await engine.update_weights(model, version=step)

Tokens and log-probs are read from `meta_info.output_token_logprobs`, never re-tokenised from text. An aborted
request (HTTP 200, `finish_reason.type == "abort"`) is retried or returned marked as dropped, and counted in
`engine.stats`. Every result is checked against the weight version the engine last pushed.

Faults stay with the request they hit. Every submission carries its own `rid` (`<request_id>`, then
`<request_id>-retry<n>`; unnamed requests get a random one), so a resubmission never collides with a copy the
server still holds (SGLang refuses a live rid with 400 "Duplicate request ID detected"). After a timeout or a
dropped connection the old rid is first cancelled with `/abort_request`, so the server stops spending compute on
it. A request the server refuses (4xx) or that gets no answer after `max_retries` comes back as finish `abort` with
`meta["error"]` (and `meta["status"]`), counted in `stats.failed`; the other results of the batch are unaffected.

Control calls go to every worker and wait for all of them before deciding, so each worker sees pause -> (flush)
-> update -> continue in that order even when one fails fast and another is slow; a failure names the workers
(`WorkerError`). What a sync does with requests in flight depends on `SGLangOptions.pause_mode`:
  * `abort` (default): in-flight requests come back aborted and are resubmitted under the new weights. The cache
    is flushed (`/flush_cache` is polled until the workers are idle) before the update.
  * `retract` / `in_place`: SGLang keeps the requests in its scheduler (retracted to the waiting queue, or
    frozen in the running batch), so `/flush_cache` would answer 400 until they finish, and an update that
    flushes would trip SGLang's post-update flush. The update is sent at once with `flush_cache: false` and
    `keep_pause: true`; after `/continue_generation` the kept requests finish on the new weights (their results
    span two versions and are flagged `off_policy`), and this engine's new requests wait until `/flush_cache`
    succeeds, so none of them reuses KV computed under the old weights. The wait is bounded by
    `flush_timeout_s`.

Requests are fitted to the servers' context length (from `SGLangOptions.context_length`, or read from
`/v1/models` at `start()`): `max_new_tokens` is cut so that prompt + max_new_tokens stays below it, which SGLang
requires (it answers 400 otherwise), and the result then ends with `length`, as the embedded engine does.
SGLang checks the token budget before stop tokens, EOS and stop strings, so a stop that lands on the last allowed
token comes back as `length`; such results are reported as the `stop` they are (`meta["server_finish_reason"]`
keeps what the server said), so both engines end turns the same way. EOS ids come from `eos_token_ids`, else the
policy config's `eos_token_id` and the served model's `config.json` / `generation_config.json` (read at `start()`
when the folder is visible).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import uuid
import weakref
from typing import Any, AsyncIterator, Mapping, Sequence

try:
  import aiohttp
except ImportError:  # the optional `sglang` extra; `SGLangEngine` asks for it when one is made
  aiohttp = None

from retool_jax.models.qwen3_config import Qwen3Config
from retool_jax.rollout.types import FinishReason, GenerateRequest, GenerateResult, SamplingParams
from retool_jax.rollout.weight_sync import prune_versions, version_dir, write_hf_checkpoint

ON_ABORT = ("retry", "drop")
PAUSE_MODES = ("abort", "retract", "in_place")
# Fields of the served config.json that must match the policy's architecture.
ARCH_FIELDS = (
  "model_type",
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
  "num_key_value_heads",
  "head_dim",
  "tie_word_embeddings",
  "num_experts",
  "num_experts_per_tok",
  "moe_intermediate_size",
)


class SGLangError(RuntimeError):
  """A request the server refused or a server that could not be reached; names the endpoint."""

  def __init__(self, message: str, *, status: int | None = None, endpoint: str | None = None):
    super().__init__(message)
    self.status = status
    self.endpoint = endpoint


@dataclasses.dataclass(frozen=True)
class SGLangOptions:
  """Client policy: concurrency, timeouts, retries, abort handling and weight sync."""

  max_concurrency: int = 256  # /generate calls in flight at once
  request_timeout_s: float = 3600.0  # one /generate, including time parked behind a weight update
  connect_timeout_s: float = 10.0
  max_retries: int = 6  # per call, on connection errors, timeouts and 5xx
  backoff_s: float = 0.5  # first retry delay; doubles up to max_backoff_s, with jitter
  max_backoff_s: float = 16.0
  on_abort: str = "retry"  # "retry": resubmit an aborted request; "drop": return it marked dropped
  max_abort_retries: int = 3
  seed_field: str | None = "sampling_seed"  # where SamplingParams.seed goes; None never sends it
  startup_timeout_s: float = 1800.0
  poll_s: float = 1.0  # /health_generate and /flush_cache polling period
  flush_timeout_s: float = 300.0
  pause_mode: str = "abort"  # /pause_generation mode: "abort" resubmits in-flight requests, the others keep them
  sync_dir: str | None = None  # weight checkpoints go to <sync_dir>/weight_v<N>
  sync_dtype: str | None = "bfloat16"  # dtype of the written checkpoint (None: the policy's param dtype)
  keep_versions: int = 2  # weight_v<N> folders kept after a sync
  context_length: int | None = None  # the servers' --context-length (None: read from /v1/models at start())

  def __post_init__(self):
    if self.on_abort not in ON_ABORT:
      raise ValueError(f"on_abort={self.on_abort!r} must be one of {ON_ABORT}")
    if self.pause_mode not in PAUSE_MODES:
      raise ValueError(f"pause_mode={self.pause_mode!r} must be one of {PAUSE_MODES}")
    for name in ("max_concurrency", "keep_versions"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    for name in ("max_retries", "max_abort_retries"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
    if self.context_length is not None and self.context_length < 2:
      raise ValueError(f"context_length={self.context_length} must be >= 2 or None")


@dataclasses.dataclass
class EngineStats:
  """Counters over the engine's life; nothing is lost without being counted here."""

  requests: int = 0  # /generate calls sent (retries included)
  completed: int = 0  # results returned that were not aborted
  transport_retries: int = 0  # connection errors, timeouts and 5xx retried
  aborts: int = 0  # responses with finish_reason "abort"
  abort_retries: int = 0  # of those, resubmitted
  dropped: int = 0  # of those, returned marked dropped
  off_policy: int = 0  # results whose weight_version is not the engine's current one
  weight_syncs: int = 0
  flush_retries: int = 0  # /flush_cache answered 400 (requests still in flight) and was retried
  too_long: int = 0  # requests answered `abort` without a call: the prompt fills the servers' context length
  failed: int = 0  # requests returned marked with `meta["error"]`: refused (4xx) or unanswered after retries
  rid_aborts: int = 0  # /abort_request calls for a rid given up after a timeout or a dropped connection
  duplicate_rids: int = 0  # 400 "Duplicate request ID" answers (resubmitted under a fresh rid)

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class _LoopState:
  semaphore: asyncio.Semaphore
  open_gate: asyncio.Event  # cleared while weights are being swapped


class _Retryable(Exception):
  pass


class WorkerError(SGLangError):
  """A control call that failed on some workers; `failed` maps each such worker to its error."""

  def __init__(self, path: str, failed: Mapping[str, str], succeeded: Sequence[str]):
    detail = "; ".join(f"{u}: {m}" for u, m in failed.items())
    ok = f" (succeeded on {', '.join(succeeded)})" if succeeded else ""
    super().__init__(
      f"POST {path} failed on {len(failed)} of {len(failed) + len(succeeded)} workers: {detail}{ok}"
    )
    self.path = path
    self.failed = dict(failed)
    self.succeeded = list(succeeded)


def generate_payload(request: GenerateRequest, seed_field: str | None = "sampling_seed") -> dict[str, Any]:
  """The `/generate` body for one request: input ids in, log-probs out, nothing trimmed or skipped."""
  s: SamplingParams = request.sampling
  params: dict[str, Any] = {
    "max_new_tokens": s.max_new_tokens,
    "temperature": s.temperature,
    "top_p": s.top_p,
    "top_k": s.top_k,
    "no_stop_trim": True,
    "skip_special_tokens": False,
  }
  if s.stop:
    params["stop"] = list(s.stop)
  if s.stop_token_ids:
    params["stop_token_ids"] = list(s.stop_token_ids)
  if s.seed is not None and seed_field:
    params[seed_field] = s.seed
  body: dict[str, Any] = {"input_ids": list(request.prompt_ids), "sampling_params": params, "return_logprob": True}
  if request.request_id is not None:
    body["rid"] = request.request_id
  return body


def parse_generate_output(out: Mapping[str, Any], where: str = "/generate") -> GenerateResult:
  """One `/generate` output -> a `GenerateResult` (ids and log-probs from `output_token_logprobs`)."""
  meta = out.get("meta_info") if isinstance(out, Mapping) else None
  if not isinstance(meta, Mapping):
    raise SGLangError(f"{where}: response has no meta_info object: {str(out)[:200]}", endpoint=where)
  fr = meta.get("finish_reason")
  if not isinstance(fr, Mapping) or fr.get("type") not in ("stop", "length", "abort"):
    raise SGLangError(f"{where}: meta_info.finish_reason={fr!r} is not a finished request", endpoint=where)
  finish = FinishReason(type=fr["type"], matched=fr.get("matched"), message=fr.get("message"))
  triples = meta.get("output_token_logprobs")
  if triples is None:
    if finish.type != "abort":
      raise SGLangError(
        f"{where}: meta_info.output_token_logprobs is missing (was return_logprob sent?)", endpoint=where
      )
    triples = []
  ids, logprobs = [], []
  for i, t in enumerate(triples):
    if not isinstance(t, (list, tuple)) or len(t) < 2 or t[0] is None:
      raise SGLangError(
        f"{where}: meta_info.output_token_logprobs[{i}]={t!r} is not [logprob, token_id, text]", endpoint=where
      )
    logprobs.append(float(t[0]))
    ids.append(int(t[1]))
  if "output_ids" in out and out["output_ids"] is not None and list(out["output_ids"]) != ids:
    raise SGLangError(
      f"{where}: output_ids and output_token_logprobs disagree for request {meta.get('id')}", endpoint=where
    )
  extra = {
    k: meta[k] for k in ("id", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency") if k in meta
  }
  if "text" in out:
    extra["text"] = out["text"]
  return GenerateResult(
    output_ids=ids,
    output_logprobs=logprobs,
    finish_reason=finish,
    weight_version=meta.get("weight_version"),
    meta=extra,
  )


def finish_at_budget(
  result: GenerateResult, request: GenerateRequest, eos_token_ids: Sequence[int] = ()
) -> GenerateResult:
  """Reports a `length` finish whose last token is EOS or one of the request's stops as that `stop`.

  SGLang checks `max_new_tokens` before EOS, stop tokens and stop strings, so a stop on the last allowed token is
  answered as `length`. EOS and stop tokens are seen in the last id; a stop string in the untrimmed text (SGLang
  checks the whole output text after every token, so a stop string in it can only have been completed by the last
  token). The server's own answer stays in `meta["server_finish_reason"]`.
  """
  if result.finish_reason.type != "length" or not result.output_ids:
    return result
  sampling = request.sampling
  matched: int | str | None = None
  if result.output_ids[-1] in (*eos_token_ids, *sampling.stop_token_ids):
    matched = result.output_ids[-1]
  elif isinstance(text := result.meta.get("text"), str):
    matched = next((s for s in sampling.stop if s in text), None)
  if matched is not None:
    result.meta["server_finish_reason"] = "length"
    result.finish_reason = FinishReason("stop", matched)
  return result


def _error_message(body: str) -> str:
  with contextlib.suppress(ValueError, TypeError, AttributeError):
    data = json.loads(body)
    if isinstance(data.get("error"), Mapping):
      return str(data["error"].get("message"))
    if "message" in data:
      return str(data["message"])
  return body.strip()[:500]


def served_eos_ids(model_path: Any) -> set[int]:
  """EOS ids in a served model folder's `config.json` and `generation_config.json` (empty when not visible)."""
  ids: set[int] = set()
  if not isinstance(model_path, str):
    return ids
  for name in ("config.json", "generation_config.json"):
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
      with open(os.path.join(model_path, name)) as f:
        eos = json.load(f).get("eos_token_id")
      ids.update(int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None)
  return ids


def check_served_model(info: Mapping[str, Any], policy: Qwen3Config | None, where: str) -> None:
  """Checks `/get_model_info` against the policy: a generation model of the same architecture."""
  if info.get("is_generation") is False:
    raise SGLangError(
      f"{where}: the server's model {info.get('model_path')!r} is not a generation model", endpoint=where
    )
  if policy is None:
    return
  want = policy.to_hf()
  served: Mapping[str, Any] = {}
  path = info.get("model_path")
  if isinstance(path, str) and os.path.isfile(os.path.join(path, "config.json")):
    with open(os.path.join(path, "config.json")) as f:
      served = json.load(f)
  elif info.get("model_type") is not None:
    served = {"model_type": info["model_type"]}
  wrong = [
    f"{k}: served {served[k]!r}, policy {want.get(k)!r}"
    for k in ARCH_FIELDS
    if k in served and want.get(k) is not None and served[k] != want[k]
  ]
  if wrong:
    raise SGLangError(
      f"{where}: the server's model {path!r} does not match the policy ({'; '.join(wrong)})", endpoint=where
    )


class SGLangEngine:
  """`Engine` over HTTP: an SGLang server, or an sglang-router with its workers listed in `worker_urls`.

  Generation goes to `url`. Control calls (pause, flush, weight update, continue) go to every worker in
  `worker_urls` (default: `url` itself). `model_config` is the policy's config; it is checked against the
  served model at `start()` and used to write checkpoints when `update_weights` gets bare parameters.
  `eos_token_ids` (default: the policy's EOS plus the served model's) turn a `length` whose last token is EOS
  into `stop`, as `JaxEngine` reports it.
  """

  def __init__(
    self,
    url: str,
    *,
    worker_urls: Sequence[str] | None = None,
    model_config: Qwen3Config | None = None,
    options: SGLangOptions | None = None,
    eos_token_ids: Sequence[int] | None = None,
  ):
    if not url.startswith(("http://", "https://")):
      raise ValueError(f"SGLang url {url!r} must start with http:// or https://")
    if aiohttp is None:
      raise ImportError("SGLangEngine needs aiohttp: pip install 'retool_jax[sglang]'")
    self.url = url.rstrip("/")
    self.worker_urls = tuple(u.rstrip("/") for u in (worker_urls or (url,)))
    self.model_config = model_config
    self.options = options or SGLangOptions()
    self.stats = EngineStats()
    self.weight_version: str | None = None  # the version the server should be serving
    self.context_length: int | None = self.options.context_length  # prompt + max_new_tokens stay below it
    self.model_info: dict[str, Any] = {}
    self._eos_given = eos_token_ids is not None
    if eos_token_ids is None:
      eos_token_ids = (
        () if model_config is None or model_config.eos_token_id is None else (model_config.eos_token_id,)
      )
    self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
    self._session = None
    self._session_loop = None
    self._loops: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

  # ---- connection plumbing ----------------------------------------------------------------------

  def _state(self) -> _LoopState:
    loop = asyncio.get_running_loop()
    state = self._loops.get(loop)
    if state is None:
      state = _LoopState(asyncio.Semaphore(self.options.max_concurrency), asyncio.Event())
      state.open_gate.set()
      self._loops[loop] = state
    return state

  async def __aenter__(self) -> "SGLangEngine":
    await self.close()
    self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.options.max_concurrency))
    self._session_loop = asyncio.get_running_loop()
    return self

  async def __aexit__(self, *exc) -> None:
    await self.close()

  async def close(self) -> None:
    """Closes the session opened by `async with`; calls outside one use a session of their own."""
    if self._session is not None and self._session_loop is asyncio.get_running_loop():
      await self._session.close()
    self._session, self._session_loop = None, None

  @contextlib.asynccontextmanager
  async def _client(self) -> AsyncIterator[Any]:
    if self._session is not None and not self._session.closed and self._session_loop is asyncio.get_running_loop():
      yield self._session
      return
    async with aiohttp.ClientSession(
      connector=aiohttp.TCPConnector(limit=self.options.max_concurrency)
    ) as session:
      yield session

  def _timeout(self, timeout_s: float | None = None):
    opts = self.options
    return aiohttp.ClientTimeout(total=timeout_s or opts.request_timeout_s, sock_connect=opts.connect_timeout_s)

  async def _send(self, session, method: str, endpoint: str, payload: Any, timeout) -> tuple[int, str]:
    """One HTTP call; a 5xx raises `_Retryable` (as connection errors and timeouts raise their own errors)."""
    async with session.request(method, endpoint, json=payload, timeout=timeout) as resp:
      body = await resp.text()
      if resp.status >= 500:
        raise _Retryable(f"HTTP {resp.status}: {_error_message(body)}")
      return resp.status, body

  def _backoff(self, attempt: int) -> float:
    opts = self.options
    return min(opts.max_backoff_s, opts.backoff_s * 2**attempt) * (0.5 + 0.5 * random.random())

  async def _call(
    self, session, method: str, base: str, path: str, payload: Any = None, timeout_s: float | None = None
  ) -> tuple[int, str]:
    """One HTTP call, retried with backoff on connection errors, timeouts and 5xx; returns (status, body)."""
    opts = self.options
    timeout = self._timeout(timeout_s)
    endpoint = base + path
    for attempt in range(opts.max_retries + 1):
      try:
        return await self._send(session, method, endpoint, payload, timeout)
      except (aiohttp.ClientError, asyncio.TimeoutError, _Retryable) as e:
        if attempt == opts.max_retries:
          raise SGLangError(
            f"{method} {endpoint} failed after {attempt + 1} attempts: {e!r}", endpoint=endpoint
          ) from e
        self.stats.transport_retries += 1
        await asyncio.sleep(self._backoff(attempt))
    raise AssertionError("unreachable")

  async def _control(self, session, path: str, payload: Any = None) -> dict[str, dict[str, Any]]:
    """POSTs a control call to every worker and waits for all of them; raises `WorkerError` naming the failures.

    A worker fails on a non-200, on `success: false` or when it cannot be reached.
    """

    async def one(base: str) -> dict[str, Any]:
      status, body = await self._call(session, "POST", base, path, payload)
      data: dict[str, Any] = {}
      with contextlib.suppress(ValueError):
        loaded = json.loads(body)
        data = loaded if isinstance(loaded, dict) else {}
      if status != 200 or data.get("success") is False:
        raise SGLangError(
          f"POST {base}{path}: HTTP {status}: {_error_message(body)}", status=status, endpoint=base + path
        )
      return data

    return await self._on_every_worker(path, one)

  async def _on_every_worker(self, path: str, fn) -> dict[str, Any]:
    outs = await asyncio.gather(*(fn(u) for u in self.worker_urls), return_exceptions=True)
    for out in outs:
      if isinstance(out, BaseException) and not isinstance(out, Exception):
        raise out  # cancellation and the like
    failed = {u: str(o) for u, o in zip(self.worker_urls, outs) if isinstance(o, Exception)}
    if failed:
      raise WorkerError(path, failed, [u for u in self.worker_urls if u not in failed])
    return dict(zip(self.worker_urls, outs))

  # ---- start-up and health ----------------------------------------------------------------------

  async def start(self, timeout_s: float | None = None) -> dict[str, Any]:
    """Waits until every worker answers `/health_generate` 200, then checks `/get_model_info`.

    Also reads the context length from `/v1/models` (`max_model_len`) unless `SGLangOptions.context_length`
    gives it.
    """
    deadline = asyncio.get_running_loop().time() + (timeout_s or self.options.startup_timeout_s)
    async with self._client() as session:
      for base in dict.fromkeys((self.url, *self.worker_urls)):
        while not await self._healthy(session, base):
          if asyncio.get_running_loop().time() > deadline:
            raise SGLangError(
              f"{base}/health_generate did not answer 200 within the start-up timeout",
              endpoint=base + "/health_generate",
            )
          await asyncio.sleep(self.options.poll_s)
      versions = set()
      for base in self.worker_urls:
        status, body = await self._call(session, "GET", base, "/get_model_info")
        if status != 200:
          raise SGLangError(
            f"GET {base}/get_model_info: HTTP {status}: {_error_message(body)}",
            status=status,
            endpoint=base + "/get_model_info",
          )
        info = json.loads(body)
        check_served_model(info, self.model_config, f"{base}/get_model_info")
        if not self._eos_given:
          self.eos_token_ids = tuple(sorted({*self.eos_token_ids, *served_eos_ids(info.get("model_path"))}))
        versions.add(info.get("weight_version"))
        self.model_info = info
      if self.context_length is None:
        self.context_length = await self._served_context_length(session)
    if len(versions) > 1:
      raise SGLangError(f"workers serve different weight versions {sorted(map(str, versions))}")
    self.weight_version = None if versions == {None} else str(versions.pop())
    return self.model_info

  async def _served_context_length(self, session) -> int | None:
    """The smallest `max_model_len` the workers' `/v1/models` report (None when a server does not say)."""
    lengths = []
    for base in self.worker_urls:
      status, body = await self._call(session, "GET", base, "/v1/models")
      if status != 200:
        return None
      try:
        cards = json.loads(body)["data"]
        lengths += [int(card["max_model_len"]) for card in cards if card.get("max_model_len")]
      except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return min(lengths) if lengths else None

  async def _healthy(self, session, base: str) -> bool:
    timeout = aiohttp.ClientTimeout(
      total=max(30.0, self.options.connect_timeout_s), sock_connect=self.options.connect_timeout_s
    )
    try:
      async with session.get(base + "/health_generate", timeout=timeout) as resp:
        await resp.read()
        return resp.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
      return False

  async def health(self) -> bool:
    async with self._client() as session:
      return all(
        await asyncio.gather(*(self._healthy(session, u) for u in dict.fromkeys((self.url, *self.worker_urls))))
      )

  # ---- generation -------------------------------------------------------------------------------

  async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
    state = self._state()
    async with self._client() as session:
      outs = await asyncio.gather(
        *(self._generate_one(session, state, r) for r in requests), return_exceptions=True
      )
    results = []
    for r, out in zip(requests, outs):
      if isinstance(out, SGLangError):
        out = self._failed(str(out), out.status, r.request_id)
      elif isinstance(out, BaseException):
        raise out
      results.append(out)
    return results

  def _failed(self, message: str, status: int | None, rid: str | None) -> GenerateResult:
    """A request that fails alone: finish `abort` with the reason in `meta["error"]`, counted in `stats.failed`."""
    self.stats.failed += 1
    meta = {"error": message, "status": status, "rid": rid}
    return GenerateResult([], [], FinishReason("abort", message=message), self.weight_version, meta)

  async def _abort_rid(self, session, rid: str) -> None:
    """Asks the servers to drop a submission given up on (a no-op where the rid is not live)."""
    self.stats.rid_aborts += 1
    timeout = aiohttp.ClientTimeout(total=max(5.0, self.options.connect_timeout_s))
    for base in dict.fromkeys((self.url, *self.worker_urls)):
      with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        async with session.post(base + "/abort_request", json={"rid": rid}, timeout=timeout) as resp:
          await resp.read()

  async def _generate_one(self, session, state: _LoopState, request: GenerateRequest) -> GenerateResult:
    opts = self.options
    payload = generate_payload(request, opts.seed_field)
    base_rid = request.request_id if request.request_id is not None else uuid.uuid4().hex
    where = f"/generate (request {request.request_id or '<unnamed>'})"
    if self.context_length is not None:
      # SGLang answers 400 unless prompt + max_new_tokens < its context length (the newest releases allow ==).
      room = self.context_length - 1 - len(request.prompt_ids)
      if room < 1:
        self.stats.too_long += 1
        message = (
          f"prompt of {len(request.prompt_ids)} tokens leaves no room within the servers' context length "
          f"{self.context_length}"
        )
        return GenerateResult(
          [], [], FinishReason("abort", message=message), self.weight_version, {"too_long": True}
        )
      payload["sampling_params"]["max_new_tokens"] = min(request.sampling.max_new_tokens, room)
    timeout = self._timeout()
    submissions = aborts = transport_failures = duplicates = 0
    while True:
      await state.open_gate.wait()
      sent_version = self.weight_version
      rid = payload["rid"] = base_rid if not submissions else f"{base_rid}-retry{submissions}"
      submissions += 1
      error: Exception | None = None
      async with state.semaphore:
        self.stats.requests += 1
        try:
          status, body = await self._send(session, "POST", self.url + "/generate", payload, timeout)
        except (aiohttp.ClientError, asyncio.TimeoutError, _Retryable) as e:
          error = e
      if error is not None:
        transport_failures += 1
        if not isinstance(error, _Retryable):  # the server may still hold it: stop it before going on
          await self._abort_rid(session, rid)
        if transport_failures > opts.max_retries:
          message = f"{where}: POST {self.url}/generate failed after {transport_failures} attempts: {error!r}"
          return self._failed(message, None, rid)
        self.stats.transport_retries += 1
        await asyncio.sleep(self._backoff(transport_failures - 1))
        continue
      if status != 200:
        message = _error_message(body)
        if status == 400 and "Duplicate request ID" in message and duplicates < opts.max_retries:
          duplicates += 1
          self.stats.duplicate_rids += 1
          continue
        return self._failed(f"{where}: HTTP {status}: {message}", status, rid)
      try:
        out = json.loads(body)
      except ValueError:
        return self._failed(f"{where}: response is not JSON: {body[:200]!r}", status, rid)
      if isinstance(out, list) and len(out) == 1:
        out = out[0]
      result = parse_generate_output(out, where)
      if result.finish_reason.type == "abort":
        self.stats.aborts += 1
        if opts.on_abort == "retry" and aborts < opts.max_abort_retries:
          aborts += 1
          self.stats.abort_retries += 1
          await asyncio.sleep(min(opts.max_backoff_s, opts.backoff_s * 2 ** (aborts - 1)) * random.random())
          continue
        self.stats.dropped += 1
        result.meta["dropped"] = True
        result.meta["abort_retries"] = aborts
        return result
      self.stats.completed += 1
      result.meta["abort_retries"] = aborts
      self._check_version(result, sent_version)
      return finish_at_budget(result, request, self.eos_token_ids)

  def _check_version(self, result: GenerateResult, sent_version: str | None) -> None:
    expected = self.weight_version
    if expected is None:
      return
    served = None if result.weight_version is None else str(result.weight_version)
    if served != expected or sent_version != expected:
      self.stats.off_policy += 1
      result.meta["off_policy"] = True
      result.meta["expected_weight_version"] = expected

  # ---- weight sync ------------------------------------------------------------------------------

  async def update_weights(self, params: Any, version: int) -> None:
    """Writes `params` (a `Qwen3` or its `nnx.State`) to `<sync_dir>/weight_v<version>` and loads it."""
    if self.options.sync_dir is None:
      raise ValueError(
        "SGLangEngine.update_weights needs SGLangOptions.sync_dir, a folder every SGLang worker can read"
      )
    cfg = self.model_config if self.model_config is not None else getattr(params, "config", None)
    if cfg is None:
      raise ValueError("SGLangEngine.update_weights got bare parameters; pass model_config= to the engine")
    path = version_dir(self.options.sync_dir, version)
    await asyncio.to_thread(write_hf_checkpoint, params, cfg, path, dtype=self.options.sync_dtype)
    await self.load_weights_from_disk(path, version)
    await asyncio.to_thread(prune_versions, self.options.sync_dir, self.options.keep_versions)

  async def load_weights_from_disk(self, path: str, version: int | str) -> None:
    """Pause -> (flush) -> `/update_weights_from_disk` -> continue, each step on every worker before the next.

    New requests from this engine wait until the swap is done. With `pause_mode="abort"` in-flight requests
    come back aborted and are resubmitted under the new weights; with `retract` / `in_place` they are kept and
    finish on the new weights, and new requests also wait for the cache flush that follows them (see the module
    docstring). A step that fails on any worker still waits for the others; generation is resumed everywhere
    and the `WorkerError` names the workers that failed. `weight_version` changes only when every worker
    updated.
    """
    keeps = self.options.pause_mode != "abort"
    body: dict[str, Any] = {"model_path": os.fspath(path), "weight_version": str(version)}
    if keeps:
      body.update(flush_cache=False, keep_pause=True)
    state = self._state()
    state.open_gate.clear()
    try:
      async with self._client() as session:
        try:
          await self._control(session, "/pause_generation", {"mode": self.options.pause_mode})
          if not keeps:
            await self._flush(session)
          await self._control(session, "/update_weights_from_disk", body)
          self.weight_version = str(version)
          self.stats.weight_syncs += 1
        except BaseException as failure:
          try:
            await self._control(session, "/continue_generation", {})
          except SGLangError as e:  # the first failure stays the one raised
            if isinstance(failure, SGLangError):
              failure.args = (f"{failure}; then {e}",)
          raise
        await self._control(session, "/continue_generation", {})
        if keeps:
          await self._flush(session)  # once the kept requests finished: no new request reads old-weight KV
    finally:
      state.open_gate.set()

  async def _flush(self, session) -> None:
    """`/flush_cache` answers 400 while requests are still running or waiting; poll until it succeeds."""
    deadline = asyncio.get_running_loop().time() + self.options.flush_timeout_s

    async def one(base: str) -> None:
      while True:
        status, body = await self._call(session, "POST", base, "/flush_cache")
        if status == 200:
          return
        if status != 400 or asyncio.get_running_loop().time() > deadline:
          raise SGLangError(
            f"POST {base}/flush_cache: HTTP {status}: {_error_message(body)}",
            status=status,
            endpoint=base + "/flush_cache",
          )
        self.stats.flush_retries += 1
        await asyncio.sleep(self.options.poll_s)

    await self._on_every_worker("/flush_cache", one)
