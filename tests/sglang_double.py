"""An in-process stand-in for an SGLang server, answering like the real one on the endpoints RL uses.

Behaviour reproduced (SGLang `http_server.py` / `tokenizer_manager.py` / `io_struct.py` and its docs):
  * `/generate` takes `text` or `input_ids`, one prompt or a batch; a batch (or `n > 1`) answers a list, in
    prompt-major order. Each output is `{"text", "output_ids", "meta_info"}`; `meta_info` has `id`,
    `finish_reason` (`{"type": "stop", "matched": id | str}`, `{"type": "length", "length": n}`,
    `{"type": "abort", "message": ...}`), `prompt_tokens`, `completion_tokens`, `cached_tokens`, `weight_version`,
    `e2e_latency` and, with `return_logprob`, `output_token_logprobs` as `[logprob, token_id, None]` triples.
  * Text is trimmed at a stop string (and special tokens skipped) unless `no_stop_trim` / `skip_special_tokens:
    false`; ids and log-probs never are. Log-probs are of `log_softmax(logits / T)` before top-k / top-p (T=1
    when greedy).
  * After every token the budget is checked first (`length`), then stop token ids and EOS (skipped entirely
    with `ignore_eos`), then stop strings in the whole output text, as `Req.check_finished` does: a stop on the
    last allowed token is answered as `length`.
  * Prompt >= context length, or prompt + max_new_tokens >= context length: 400 `{"error": {"message"}}` (the
    check of SGLang releases up to 0.5; the newest reject only prompt + max_new_tokens > context length).
  * `/v1/models` lists the model with `max_model_len` (the context length).
  * An aborted request answers HTTP 200 with `finish_reason.type == "abort"` and the tokens made so far.
  * A `rid` that is still live (registered and unfinished) is refused with 400 `Duplicate request ID detected:
    <rid>`; a batch repeating a rid is refused too. A request waiting behind a pause is not registered yet.
  * `/abort_request {"rid", "abort_all"}` answers 200 with an empty body; a rid that is not live is ignored, a
    live one aborts every live request whose rid starts with it (the scheduler matches prefixes).
  * `/health_generate` 503 until ready; `/get_model_info`; `/flush_cache` 400 while any request is live (running,
    or kept by a `retract` / `in_place` pause).
  * `/pause_generation {"mode"}`: new requests wait until `/continue_generation`. `abort` aborts every live
    request and answers once they are gone; `retract` and `in_place` keep them, frozen, in the scheduler.
  * `/update_weights_from_disk {"model_path", "weight_version", "abort_all_requests", "flush_cache",
    "keep_pause"}` -> `{"success", "message", "num_paused_requests"}` (400 with `success: false` when loading
    fails). Unpaused, it waits for live requests to finish (SGLang's writer lock); paused, it loads at once. With
    `flush_cache` (the default) the cache is flushed afterwards, which SGLang asserts: with requests still kept
    the scheduler dies, here a 500 after which the server is no longer healthy. Unless `keep_pause`, the
    scheduler resumes the kept requests right after the load (new requests still wait for the continue).
  * The server does not notice a client that gave up: the request runs on, live, until it finishes or is
    aborted (SGLang notices a disconnect only at its next poll, seconds later).

Faults to inject: `fail_next` (503s), `disconnect_next` (connections closed unanswered), `abort_next` (aborts after
`abort_after_tokens`), `hold_next` / `hold_s` (requests held live before decoding, e.g. past a client's timeout),
`update_delay_s` (a slow worker) and `fail_update` (a worker whose update fails at once). `events` records
(monotonic time, path, "start" | "end") for every control call, so several workers' orders can be compared.

The "model" is either a seeded hash (`FakeModel`) or a real retool_jax Qwen3 read from an HF folder
(`QwenModel`), reloaded from disk on every weight update.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from aiohttp import web
from flax import nnx

from retool_jax.models.qwen3_hf import load_hf

SPECIALS = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?\n"
PIECES = ("th", "he", "</", "ans", "wer>")


def piece(token_id: int) -> str:
  if token_id in SPECIALS:
    return SPECIALS[token_id]
  i = token_id - len(SPECIALS)
  if 0 <= i < len(ALPHABET):
    return ALPHABET[i]
  j = i - len(ALPHABET)
  if 0 <= j < len(PIECES):
    return PIECES[j]
  return f"<{token_id}>"


def encode(text: str) -> list[int]:
  """Character-level tokeniser over ALPHABET (what `text` prompts go through)."""
  try:
    return [len(SPECIALS) + ALPHABET.index(c) for c in text]
  except ValueError as e:
    raise ValueError(f"the double's tokenizer has no token for a character of {text!r}") from e


def detokenize(ids, skip_special_tokens: bool) -> str:
  return "".join(piece(t) for t in ids if not (skip_special_tokens and t in SPECIALS))


class FakeModel:
  """Next-token logits from a hash of (weights fingerprint, last tokens): deterministic and cheap."""

  def __init__(self, vocab_size: int = 64, salt: int = 0):
    self.vocab_size = vocab_size
    self.salt = salt

  def load(self, model_path: str) -> None:
    names = sorted(n for n in os.listdir(model_path) if n.endswith(".safetensors"))
    if not names or not os.path.isfile(os.path.join(model_path, "config.json")):
      raise FileNotFoundError(f"{model_path}: no config.json / *.safetensors")
    crc = 0
    for n in names:
      with open(os.path.join(model_path, n), "rb") as f:
        crc = zlib.crc32(f.read(), crc)
    self.salt = crc

  def logits(self, ids: list[int]) -> np.ndarray:
    key = zlib.crc32(np.asarray([self.salt, len(ids), *ids[-4:]], np.int64).tobytes())
    return np.random.default_rng(key).normal(0.0, 2.0, self.vocab_size)


class QwenModel:
  """A real retool_jax Qwen3 read with `load_hf`; the whole prefix is re-run for every token (tiny models)."""

  def __init__(self, model_path: str, max_len: int = 64):
    self.max_len = max_len
    self.load(model_path)

  def load(self, model_path: str) -> None:
    model = load_hf(model_path)
    graphdef, state = nnx.split(model)
    self.vocab_size = model.config.vocab_size

    @jax.jit
    def last_logits(state, ids, n):
      return nnx.merge(graphdef, state)(ids)[0, n - 1]

    self._fn = lambda ids: np.asarray(
      last_logits(state, jnp.asarray([ids + [0] * (self.max_len - len(ids))]), len(ids)), np.float64
    )

  def logits(self, ids: list[int]) -> np.ndarray:
    if len(ids) > self.max_len:
      raise ValueError(f"prefix of {len(ids)} tokens exceeds the double's max_len={self.max_len}")
    return self._fn(list(ids))


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


class _Aborted(Exception):
  pass


class SGLangDouble:
  """Runs the fake server on 127.0.0.1:<ephemeral> in a thread: `with SGLangDouble() as s: s.url`."""

  def __init__(
    self,
    model=None,
    *,
    model_path: str = "/models/fake-qwen3",
    context_length: int = 64,
    eos_token_id: int = 2,
    random_seed: int = 0,
    token_delay_s: float = 0.0,
    ready: bool = True,
  ):
    self.model = model or FakeModel()
    self.model_path = model_path
    self.context_length = context_length
    self.eos_token_id = eos_token_id
    self.random_seed = random_seed
    self.token_delay_s = token_delay_s
    self.ready = ready
    self.weight_version = "default"
    self.log: list[tuple[str, object]] = []  # (path, body) of every call
    self.fail_next = 0  # next /generate calls answered 503
    self.disconnect_next = 0  # next /generate calls closed without an answer
    self.abort_next = 0  # next /generate requests aborted ...
    self.abort_after_tokens = 1  # ... after this many tokens
    self.hold_next = 0  # next /generate requests held live for hold_s before decoding
    self.hold_s = 0.0
    self.update_delay_s = 0.0  # /update_weights_from_disk takes this long (a slow worker)
    self.fail_update: str | None = None  # /update_weights_from_disk fails at once with this message
    self.paused = False  # new requests wait (the tokenizer manager's pause)
    self.pause_mode = None
    self.scheduler_paused = False  # live requests are frozen (retract / in_place)
    self.running: set[str] = set()  # live rids: registered and unfinished
    self.finished: dict[str, dict] = {}  # rid -> finish_reason of every request that ended
    self.events: list[tuple[float, str, str]] = []
    self.max_running = 0
    self._abort_epoch = 0
    self._aborted: set[str] = set()  # live rids aborted by /abort_request
    self._counter = 0
    self._loop: asyncio.AbstractEventLoop | None = None
    self._thread: threading.Thread | None = None
    self.url = ""

  # ---- lifecycle ---------------------------------------------------------------------------------

  def __enter__(self) -> "SGLangDouble":
    started = threading.Event()

    def serve():
      self._loop = asyncio.new_event_loop()
      asyncio.set_event_loop(self._loop)
      self._runner = web.AppRunner(self._app())
      self._loop.run_until_complete(self._runner.setup())
      site = web.TCPSite(self._runner, "127.0.0.1", 0)
      self._loop.run_until_complete(site.start())
      self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
      self._resume = asyncio.Condition()
      started.set()
      self._loop.run_forever()
      self._loop.run_until_complete(self._runner.cleanup())
      self._loop.close()

    self._thread = threading.Thread(target=serve, daemon=True)
    self._thread.start()
    started.wait(10)
    return self

  def __exit__(self, *exc) -> None:
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(10)

  def _app(self) -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/generate", self._generate)
    app.router.add_get("/health_generate", self._health)
    app.router.add_get("/health", self._health)
    app.router.add_get("/get_model_info", self._model_info)
    app.router.add_get("/v1/models", self._models)
    app.router.add_route("*", "/flush_cache", self._flush_cache)
    app.router.add_post("/pause_generation", self._pause)
    app.router.add_post("/continue_generation", self._continue)
    app.router.add_post("/update_weights_from_disk", self._update_weights)
    app.router.add_post("/abort_request", self._abort_request)
    return app

  def _event(self, path: str, phase: str) -> None:
    self.events.append((time.monotonic(), path, phase))

  # ---- control endpoints ---------------------------------------------------------------------------

  async def _health(self, request: web.Request) -> web.Response:
    self.log.append((request.path, None))
    return web.Response(status=200 if self.ready else 503)

  async def _model_info(self, request: web.Request) -> web.Response:
    self.log.append((request.path, None))
    return web.json_response(
      {
        "model_path": self.model_path,
        "tokenizer_path": self.model_path,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": self.weight_version,
      }
    )

  async def _models(self, request: web.Request) -> web.Response:
    self.log.append((request.path, None))
    card = {
      "id": self.model_path,
      "object": "model",
      "created": 0,
      "owned_by": "sglang",
      "root": self.model_path,
      "max_model_len": self.context_length,
    }
    return web.json_response({"object": "list", "data": [card]})

  async def _flush_cache(self, request: web.Request) -> web.Response:
    self.log.append((request.path, None))
    return web.Response(
      status=400 if self.running else 200,
      text="Cache flushed.\nPlease check backend logs for more details. (When there are running "
      "or waiting requests, the operation will not be performed.)\n",
    )

  async def _pause(self, request: web.Request) -> web.Response:
    body = await request.json() if request.can_read_body else {}
    self.log.append((request.path, body))
    self._event(request.path, "start")
    self.paused, self.pause_mode = True, body.get("mode", "abort")
    if self.pause_mode == "abort":
      self._abort_epoch += 1
      while self.running:
        await asyncio.sleep(0.001)
    else:
      self.scheduler_paused = True
    self._event(request.path, "end")
    return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

  async def _continue(self, request: web.Request) -> web.Response:
    self.log.append((request.path, await request.json() if request.can_read_body else None))
    self._event(request.path, "start")
    async with self._resume:
      self.paused, self.pause_mode, self.scheduler_paused = False, None, False
      self._resume.notify_all()
    self._event(request.path, "end")
    return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

  async def _abort_request(self, request: web.Request) -> web.Response:
    body = await request.json() if request.can_read_body else {}
    self.log.append((request.path, body))
    rid = body.get("rid") or ""
    if body.get("abort_all"):
      self._aborted |= self.running
    elif rid in self.running:
      self._aborted |= {r for r in self.running if r.startswith(rid)}
    return web.Response(status=200)

  async def _update_weights(self, request: web.Request) -> web.Response:
    body = await request.json()
    self.log.append((request.path, body))
    self._event(request.path, "start")
    try:
      return await self._load(body)
    finally:
      self._event(request.path, "end")

  async def _load(self, body) -> web.Response:
    def failed(message: str) -> web.Response:
      return web.json_response({"success": False, "message": message, "num_paused_requests": 0}, status=400)

    if self.fail_update is not None:
      return failed(self.fail_update)
    if body.get("abort_all_requests"):
      self._aborted |= self.running
    if not self.paused:  # the update waits for running requests; a paused server loads at once
      while self.running:
        await asyncio.sleep(0.001)
    if self.update_delay_s:
      await asyncio.sleep(self.update_delay_s)
    path = body.get("model_path")
    try:
      if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
      await asyncio.to_thread(self.model.load, path)
    except Exception as e:  # noqa: BLE001 - the server reports any load failure as success: false
      return failed(f"Failed to update weights: {e}.")
    self.model_path = path
    if body.get("flush_cache", True) and self.running:
      self.ready = False  # SGLang's scheduler fails its assertion and the server goes down
      return web.json_response({"error": {"message": "Cache flush failed after updating weights"}}, status=500)
    if not body.get("keep_pause", False):
      self.scheduler_paused = False
    message = "Succeeded to update model weights."
    if body.get("weight_version") is not None:
      self.weight_version = str(body["weight_version"])
      message += f" Weight version updated to {self.weight_version}."
    return web.json_response({"success": True, "message": message, "num_paused_requests": 0})

  # ---- generation -----------------------------------------------------------------------------------

  async def _generate(self, request: web.Request) -> web.StreamResponse:
    body = await request.json()
    self.log.append((request.path, body))
    if self.disconnect_next:
      self.disconnect_next -= 1
      request.transport.close()
      raise ConnectionResetError("dropped by the double")
    if self.fail_next:
      self.fail_next -= 1
      return web.json_response({"error": {"message": "Service Unavailable"}}, status=503)
    try:
      prompts, single = self._prompts(body)
      params = body.get("sampling_params") or {}
      if isinstance(params, list):
        raise ValueError("per-prompt sampling_params lists are not supported by the double")
      n = int(params.get("n", 1))
      for ids in prompts:
        self._check_length(ids, params)
    except ValueError as e:
      return web.json_response({"error": {"message": str(e)}}, status=400)
    async with self._resume:  # a paused server holds new requests before they are registered
      await self._resume.wait_for(lambda: not self.paused)
    rids = body.get("rid")
    jobs = []
    for i, ids in enumerate(prompts):
      for j in range(n):
        if isinstance(rids, list):
          rid = rids[i] if n == 1 else f"{rids[i]}-{j}"
        else:
          rid = rids if rids and len(prompts) * n == 1 else f"req-{self._next()}"
        jobs.append((ids, rid, j))
    batch = [rid for _, rid, _ in jobs]
    if len(set(batch)) < len(batch):
      return web.json_response(
        {"error": {"message": f"Duplicate request IDs detected within the request: {batch}"}}, status=400
      )
    for rid in batch:
      if rid in self.running:
        return web.json_response({"error": {"message": f"Duplicate request ID detected: {rid}"}}, status=400)
    self.running.update(batch)
    self.max_running = max(self.max_running, len(self.running))
    hold = 0.0
    if self.hold_next:
      self.hold_next -= 1
      hold = self.hold_s
    outs = await asyncio.gather(
      *(self._one(ids, params, rid, j, bool(body.get("return_logprob")), hold) for ids, rid, j in jobs)
    )
    return web.json_response(outs[0] if single and n == 1 else outs)

  def _next(self) -> int:
    self._counter += 1
    return self._counter

  def _prompts(self, body) -> tuple[list[list[int]], bool]:
    if ("text" in body) == ("input_ids" in body):
      raise ValueError("Either text or input_ids should be provided.")
    if "text" in body:
      text = body["text"]
      return ([encode(t) for t in text], False) if isinstance(text, list) else ([encode(text)], True)
    ids = body["input_ids"]
    if ids and isinstance(ids[0], list):
      return [list(map(int, x)) for x in ids], False
    return [list(map(int, ids))], True

  def _check_length(self, ids: list[int], params) -> None:
    n_in, ctx = len(ids), self.context_length
    if n_in >= ctx:
      raise ValueError(f"The input ({n_in} tokens) is longer than the model's context length ({ctx} tokens).")
    new = params.get("max_new_tokens")
    if new is not None and new + n_in >= ctx:
      raise ValueError(
        f"Requested token count exceeds the model's maximum context length of {ctx} tokens. You requested a "
        f"total of {new + n_in} tokens: {n_in} tokens from the input messages and {new} tokens for the "
        f"completion. Please reduce the number of tokens in the input messages or the completion to fit "
        f"within the limit."
      )

  async def _one(
    self, prompt: list[int], params, rid: str, sample: int, return_logprob: bool, hold_s: float = 0.0
  ) -> dict:
    start = time.perf_counter()
    epoch = self._abort_epoch
    abort_at = None
    if self.abort_next:
      self.abort_next -= 1
      abort_at = self.abort_after_tokens
    temperature = float(params.get("temperature", 1.0))
    top_k, top_p = int(params.get("top_k", -1)), float(params.get("top_p", 1.0))
    seed = params.get("sampling_seed")
    rng = np.random.default_rng([seed, sample, *prompt] if seed is not None else [self.random_seed, self._next()])
    stops = params.get("stop") or []
    stops = [stops] if isinstance(stops, str) else list(stops)
    stop_ids = set() if params.get("ignore_eos") else {*(params.get("stop_token_ids") or []), self.eos_token_id}
    max_new = int(params.get("max_new_tokens", 128))
    ids, lps, finish = [], [], None
    try:
      held_until = time.monotonic() + hold_s
      while time.monotonic() < held_until and rid not in self._aborted and self._abort_epoch == epoch:
        await asyncio.sleep(0.005)
      while finish is None:
        if abort_at is not None and len(ids) >= abort_at:
          raise _Aborted("Abort by the double's fault injection")
        while self.scheduler_paused and rid not in self._aborted:  # retract / in_place: kept, frozen
          await asyncio.sleep(0.001)
        if self._abort_epoch != epoch or rid in self._aborted:
          raise _Aborted("Abort before prefill" if not ids else "Abort in running batch")
        if self.token_delay_s:
          await asyncio.sleep(self.token_delay_s)
        else:
          await asyncio.sleep(0)
        logits = self.model.logits(prompt + ids)
        tok, lp = self._sample(logits, temperature, top_k, top_p, rng)
        ids.append(tok)
        lps.append(lp)
        text = detokenize(ids, skip_special_tokens=False)
        if len(ids) >= max_new:
          finish = {"type": "length", "length": max_new}
        elif tok in stop_ids:
          finish = {"type": "stop", "matched": tok}
        elif (hit := next((s for s in stops if s in text), None)) is not None:
          finish = {"type": "stop", "matched": hit}
    except _Aborted as e:
      finish = {"type": "abort", "message": str(e)}
    finally:
      self.running.discard(rid)
      self._aborted.discard(rid)
    self.finished[rid] = finish
    text = detokenize(ids, bool(params.get("skip_special_tokens", True)))
    if not params.get("no_stop_trim") and finish["type"] == "stop" and isinstance(finish["matched"], str):
      text = text[: text.find(finish["matched"])]
    meta = {
      "id": rid,
      "finish_reason": finish,
      "prompt_tokens": len(prompt),
      "weight_version": self.weight_version,
      "completion_tokens": len(ids),
      "cached_tokens": 0,
      "e2e_latency": time.perf_counter() - start,
    }
    if return_logprob:
      meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, ids)]
    return {"text": text, "output_ids": ids, "meta_info": meta}

  @staticmethod
  def _sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng) -> tuple[int, float]:
    if temperature == 0:
      tok = int(np.argmax(logits))
      return tok, float(_log_softmax(logits)[tok])
    logp = _log_softmax(logits / temperature)
    probs = np.exp(logp)
    order = np.argsort(-probs, kind="stable")
    keep = order[:top_k] if top_k > 0 else order
    cum = np.cumsum(probs[keep])
    keep = keep[: int(np.searchsorted(cum, top_p)) + 1]
    p = probs[keep] / probs[keep].sum()
    tok = int(rng.choice(keep, p=p))
    return tok, float(logp[tok])
