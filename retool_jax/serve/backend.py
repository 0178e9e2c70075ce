"""What the server does with a request: chat turns through `ChatClient` (the recorder agents use in process),
raw completions straight on the engine, both answered in OpenAI's shapes.

Every chat request goes through a `ChatClient`: a fresh one per choice for a plain request, the session's own
for a request on `/sessions/<id>/v1` (then its ids, log-probs and loss mask are the trajectory, see
`sessions`). The prompt contract's system prompt is put first when the messages have none, and tool schemas
reach the prompt only when the contract renders them (`tools_in_prompt`); calls are parsed either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from retool_jax.chat.tokenizer import IM_END, encode_text
from retool_jax.rollout.agentic import ChatClient, forced_prefix
from retool_jax.rollout.multiturn import MultiTurnConfig
from retool_jax.rollout.types import GenerateRequest, SamplingParams
from retool_jax.serve.protocol import (
  APIError,
  ChatCompletionRequest,
  CompletionRequest,
  new_id,
  normalize_messages,
  now,
)
from retool_jax.serve.sessions import Sessions

__all__ = ["ContentStream", "ServeBackend", "ServeSettings"]

OPENERS = {"tool_call": "<tool_call>", "code": "<code>"}


@dataclasses.dataclass
class ServeSettings:
  """What the served model's prompts look like and how much the server takes on.

  `config`: sampling defaults (a request's own values win), `max_context` and the call formats; `system`: put
  first when a request has no system message; `max_pending`: most sequences (choices) generating or queued at
  once, beyond which requests get 429 (None: no bound).
  """

  config: MultiTurnConfig = dataclasses.field(default_factory=MultiTurnConfig)
  system: str | None = None
  tools_in_prompt: bool = True
  max_pending: int | None = 256


class ServeBackend:
  """The engine, the tokenizer and the sessions behind the HTTP routes (`app.create_app`)."""

  def __init__(
    self, engine: Any, tokenizer: Any, settings: ServeSettings | None = None, *, model_name: str = "policy"
  ):
    self.engine, self.tokenizer = engine, tokenizer
    self.settings = settings or ServeSettings()
    self.model_name = model_name
    self.sessions = Sessions(lambda seed: ChatClient(engine, tokenizer, self.settings.config, seed=seed))
    self.pending = 0
    self.created = now()

  # ---- admission ---------------------------------------------------------------------------------

  def check_model(self, name: str) -> None:
    if name != self.model_name:
      raise APIError(
        404,
        f"the model {name!r} does not exist; this server serves {self.model_name!r}",
        param="model",
        code="model_not_found",
      )

  @contextlib.contextmanager
  def admit(self, n: int) -> Iterator[None]:
    """Holds `n` places of the bounded queue for the duration of a request; 429 when they are not free."""
    self._reserve(n)
    try:
      yield
    finally:
      self._release(n)

  def _release(self, n: int) -> None:
    self.pending -= n

  def _reserve(self, n: int) -> None:
    bound = self.settings.max_pending
    if bound is not None and self.pending + n > bound:
      raise APIError(
        429,
        f"the server is busy ({self.pending} sequences in flight, at most {bound}); retry later",
        code="rate_limit_exceeded",
      )
    self.pending += n

  # ---- chat --------------------------------------------------------------------------------------

  def _prepare(self, req: ChatCompletionRequest, session: str | None) -> tuple[list[dict], list[dict] | None]:
    """Checks the request; the messages (contract's system prompt first) and the tools the prompt renders."""
    req.check()
    self.check_model(req.model)
    if session is not None and req.n != 1:
      raise APIError(400, "n must be 1 on a session: a session records one trajectory", param="n")
    messages = normalize_messages(req.messages)
    if self.settings.system and messages[0].get("role") != "system":
      messages.insert(0, {"role": "system", "content": self.settings.system})
    tools = req.tools if self.settings.tools_in_prompt and req.tool_choice != "none" else None
    if req.top_logprobs and not hasattr(self.engine, "top_logprobs"):
      raise APIError(
        400,
        "top_logprobs needs the embedded engine (SGLang's top log-probs are not relayed)",
        param="top_logprobs",
      )
    return messages, tools

  async def _run_choice(
    self, i: int, req: ChatCompletionRequest, messages, tools, session: str | None, on_tokens=None
  ) -> tuple[dict[str, Any], int, int]:
    """Choice `i`: `(choice, prompt tokens, completion tokens)`."""
    if session is not None:
      client = self.sessions.get(session)
    else:
      client = ChatClient(self.engine, self.tokenizer, self.settings.config)
    seed = None if req.seed is None else req.seed + i
    try:
      reply = await client.chat(
        messages,
        tools,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        max_tokens=req.max_new_tokens(),
        stop=req.stops(),
        seed=seed,
        tool_choice=req.tool_choice,
        include_stop_str=False,
        on_tokens=on_tokens,
      )
    except (TypeError, ValueError) as e:
      raise APIError(400, str(e), param="messages") from None
    result = client.last_result
    if result is None and session is None:
      raise APIError(
        400,
        f"the messages leave no room for a reply in the model's {self.settings.config.max_context}-token context",
        param="messages",
        code="context_length_exceeded",
      )
    choice = await self._chat_choice(i, reply, client, req)
    return choice, client.last_prompt_tokens, len(result.output_ids) if result else 0

  async def chat(self, req: ChatCompletionRequest, session: str | None = None) -> dict[str, Any]:
    """A `chat.completion` object for the request (on the session's recorder when `session` is given)."""
    messages, tools = self._prepare(req, session)
    with self.admit(req.n):
      done = await asyncio.gather(*(self._run_choice(i, req, messages, tools, session) for i in range(req.n)))
    return {
      "id": new_id("chatcmpl"),
      "object": "chat.completion",
      "created": now(),
      "model": self.model_name,
      "choices": [choice for choice, _, _ in done],
      "usage": _usage(done[0][1], sum(c for _, _, c in done)),
    }

  async def chat_stream(self, req: ChatCompletionRequest, session: str | None = None) -> AsyncIterator[str]:
    """The request's reply as server-sent events, content sent as the engine makes it (see `ContentStream`).

    It returns once every choice is generating (or one failed: then its error is raised here, before the
    response starts, so it gets its status code); a failure later is an `error` event ending the stream.
    """
    messages, tools = self._prepare(req, session)
    self._reserve(req.n)
    events: asyncio.Queue = asyncio.Queue()

    async def run(i: int) -> None:
      try:
        out = await self._run_choice(
          i, req, messages, tools, session, lambda ids, lps: events.put_nowait(("tokens", i, ids))
        )
        events.put_nowait(("done", i, out))
      except Exception as e:  # noqa: BLE001  (reported to the client)
        events.put_nowait(("error", i, e))

    tasks = [asyncio.create_task(run(i)) for i in range(req.n)]
    try:
      first = await events.get()
      if first[0] == "error":
        raise first[2]
    except BaseException:
      for t in tasks:
        t.cancel()
      self._release(req.n)
      raise
    return self._events(req, first, events, tasks)

  async def _events(self, req, first, events: asyncio.Queue, tasks: list[asyncio.Task]) -> AsyncIterator[str]:
    base = {
      "id": new_id("chatcmpl"),
      "object": "chat.completion.chunk",
      "created": now(),
      "model": self.model_name,
    }

    def event(choices: list[dict], **extra: Any) -> str:
      return f"data: {json.dumps(base | {'choices': choices} | extra, ensure_ascii=False)}\n\n"

    def delta(i: int, d: dict, finish: str | None = None, logprobs: Any = None) -> str:
      return event([{"index": i, "delta": d, "logprobs": logprobs, "finish_reason": finish}])

    streams = [ContentStream(self.tokenizer, req, self.settings.config.call_formats) for _ in range(req.n)]
    usage = [(0, 0)] * req.n
    try:
      for i in range(req.n):
        yield delta(i, {"role": "assistant", "content": ""})
      left, ev = req.n, first
      while True:
        kind, i, payload = ev
        if kind == "tokens":
          text = streams[i].feed(payload)
          if text:
            yield delta(i, {"content": text})
        elif kind == "error":
          e = payload if isinstance(payload, APIError) else APIError(500, f"{type(payload).__name__}: {payload}")
          yield f"data: {json.dumps(e.body())}\n\n"
          return
        else:
          choice, prompt_tokens, completion_tokens = payload
          usage[i] = (prompt_tokens, completion_tokens)
          m = choice["message"]
          rest = streams[i].finish(m.get("content") or "")
          if rest:
            yield delta(i, {"content": rest})
          for k, call in enumerate(m.get("tool_calls", ())):
            fn = call["function"]
            head = {
              "index": k,
              "id": call["id"],
              "type": "function",
              "function": {"name": fn["name"], "arguments": ""},
            }
            yield delta(i, {"tool_calls": [head]})
            yield delta(i, {"tool_calls": [{"index": k, "function": {"arguments": fn["arguments"]}}]})
          if m.get("invalid_tool_calls"):
            yield delta(i, {"invalid_tool_calls": m["invalid_tool_calls"]})
          yield delta(i, {}, choice["finish_reason"], choice["logprobs"])
          left -= 1
          if not left:
            break
        ev = await events.get()
      if req.include_usage():
        yield event([], usage=_usage(usage[0][0], sum(c for _, c in usage)))
      yield "data: [DONE]\n\n"
    finally:
      for t in tasks:
        t.cancel()
      self._release(req.n)

  async def _chat_choice(self, index: int, reply: dict, client: ChatClient, req: ChatCompletionRequest) -> dict:
    calls = [
      {"id": c["id"], "type": "function", "index": c["index"], "function": dict(c["function"])}
      for c in reply.get("tool_calls", ())
    ]
    result = client.last_result
    finish = "length" if client.last_finish_reason == "length" else "tool_calls" if calls else "stop"
    message: dict[str, Any] = {"role": "assistant", "content": reply["content"] or (None if calls else "")}
    if calls:
      message["tool_calls"] = calls
    if reply.get("invalid_tool_calls"):
      message["invalid_tool_calls"] = reply["invalid_tool_calls"]  # malformed calls the model wrote, with why
    logprobs = None
    if req.logprobs and result is not None:
      prompt = client.segments[-1].ids[: client.last_prompt_tokens]
      logprobs = {
        "content": await self._token_logprobs(
          prompt, result.output_ids, result.output_logprobs, req.top_logprobs or 0, req.temperature
        )
      }
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}

  async def _token_logprobs(
    self,
    prompt: Sequence[int],
    output: Sequence[int],
    logprobs: Sequence[float],
    k: int,
    temperature: float | None,
  ) -> list[dict[str, Any]]:
    tops: list[list[tuple[int, float]]] = [[] for _ in output]
    if k and output:
      t = self.settings.config.temperature if temperature is None else temperature
      tops = await self.engine.top_logprobs(list(prompt) + list(output), len(prompt), k, t)
    return [
      self._token(tok, lp) | {"top_logprobs": [self._token(i, v) for i, v in top]}
      for tok, lp, top in zip(output, logprobs, tops)
    ]

  def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
    text = self.tokenizer.decode([token_id])
    return {"token": text, "logprob": float(logprob), "bytes": list(text.encode("utf-8"))}

  # ---- completions -------------------------------------------------------------------------------

  async def complete(self, req: CompletionRequest) -> dict[str, Any]:
    """A `text_completion` object: each prompt (text, encoded without a template, or token ids) continued."""
    req.check()
    self.check_model(req.model)
    cfg = self.settings.config
    vocab = len(self.tokenizer)
    prompts = []
    for i, p in enumerate(req.prompts()):
      ids = encode_text(self.tokenizer, p) if isinstance(p, str) else list(p)
      bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
      if not ids or bad:
        raise APIError(400, f"prompt[{i}] is empty or has ids outside [0, {vocab}): {bad[:5]}", param="prompt")
      room = cfg.max_context - len(ids)
      if room <= 0:
        raise APIError(
          400,
          f"prompt[{i}] is {len(ids)} tokens; the context holds {cfg.max_context}",
          param="prompt",
          code="context_length_exceeded",
        )
      prompts.append((ids, room))
    eos = tuple(t for t in (self.tokenizer.eos_token_id,) if t is not None)
    requests = [
      GenerateRequest(
        tuple(ids),
        SamplingParams(
          temperature=cfg.temperature if req.temperature is None else req.temperature,
          top_p=cfg.top_p if req.top_p is None else req.top_p,
          top_k=cfg.top_k if req.top_k is None else req.top_k,
          max_new_tokens=min(room, req.max_tokens or room),
          stop=req.stops(),
          stop_token_ids=eos,
          seed=None if req.seed is None else req.seed + j,
        ),
      )
      for ids, room in prompts
      for j in range(req.n)
    ]
    with self.admit(len(requests)):
      results = await self.engine.generate(requests)
    choices = []
    for index, (r, result) in enumerate(zip(requests, results)):
      if result.finish_reason.type == "abort":
        raise RuntimeError(f"the engine aborted the request: {result.finish_reason.message}")
      text = self.tokenizer.decode(result.output_ids)
      matched = result.finish_reason.matched
      if result.finish_reason.type == "stop" and isinstance(matched, str) and text.endswith(matched):
        text = text[: -len(matched)]
      logprobs = None
      if req.logprobs is not None:
        logprobs = await self._completion_logprobs(r.prompt_ids, result, req.logprobs, req.temperature)
      choices.append(
        {"index": index, "text": text, "logprobs": logprobs, "finish_reason": result.finish_reason.type}
      )
    return {
      "id": new_id("cmpl"),
      "object": "text_completion",
      "created": now(),
      "model": self.model_name,
      "choices": choices,
      "usage": _usage(sum(len(ids) for ids, _ in prompts), sum(len(r.output_ids) for r in results)),
    }

  async def _completion_logprobs(self, prompt, result, k: int, temperature: float | None) -> dict[str, Any]:
    tokens = await self._token_logprobs(prompt, result.output_ids, result.output_logprobs, k, temperature)
    offsets, at = [], 0
    for t in tokens:
      offsets.append(at)
      at += len(t["token"])
    return {
      "tokens": [t["token"] for t in tokens],
      "token_logprobs": [t["logprob"] for t in tokens],
      "top_logprobs": [{x["token"]: x["logprob"] for x in t["top_logprobs"]} for t in tokens] if k else None,
      "text_offset": offsets,
    }

  def models(self) -> dict[str, Any]:
    return {
      "object": "list",
      "data": [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "retool_jax"}],
    }


def _usage(prompt: int, completion: int) -> dict[str, int]:
  return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def stream_completion_chunks(response: dict[str, Any], include_usage: bool) -> Iterator[str]:
  """A finished `text_completion` as server-sent events (one text chunk and one finish chunk per choice)."""
  base = {
    "id": response["id"],
    "object": "text_completion",
    "created": response["created"],
    "model": response["model"],
  }
  for c in response["choices"]:
    yield f"data: {json.dumps(base | {'choices': [c | {'finish_reason': None}]}, ensure_ascii=False)}\n\n"
    last = {"index": c["index"], "text": "", "logprobs": None, "finish_reason": c["finish_reason"]}
    yield f"data: {json.dumps(base | {'choices': [last]})}\n\n"
  if include_usage:
    yield f"data: {json.dumps(base | {'choices': [], 'usage': response['usage']})}\n\n"
  yield "data: [DONE]\n\n"


class ContentStream:
  """Turns a reply's tokens, as they come, into content deltas whose concatenation is the final content.

  Text from a tool-call opener (`<tool_call>`, `<code>`) on is held back (the calls go out parsed, at the end),
  and so are trailing whitespace, a tail that may be the start of an opener or of a stop string, and an
  unfinished UTF-8 character; the last delta (`finish`) is whatever the final content adds. A reply forced to
  open with a call streams no content.
  """

  def __init__(self, tokenizer: Any, req: ChatCompletionRequest, call_formats: Sequence[str]):
    self.tokenizer = tokenizer
    self.ids: list[int] = []
    self.sent = ""
    self.off = forced_prefix(req.tool_choice) != ""
    parse = req.tool_choice != "none"
    self.openers = tuple(OPENERS[f] for f in call_formats if f in OPENERS) if parse else ()
    self.held = self.openers + req.stops() + tuple(t for t in (IM_END, tokenizer.eos_token) if t)

  def feed(self, ids: Sequence[int]) -> str:
    self.ids += ids
    if self.off:
      return ""
    text = self.tokenizer.decode(self.ids)
    cuts = [j for j in (text.find(m) for m in self.held) if j >= 0]
    safe = text[: min(cuts)] if cuts else text
    for marker in self.held:
      for k in range(min(len(marker) - 1, len(safe)), 0, -1):
        if safe.endswith(marker[:k]):
          safe = safe[:-k]
          break
    safe = safe.rstrip().rstrip("\ufffd")
    if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
      return ""
    new, self.sent = safe[len(self.sent) :], safe
    return new

  def finish(self, content: str) -> str:
    return content[len(self.sent) :] if content.startswith(self.sent) else ""
