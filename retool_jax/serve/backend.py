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
from collections.abc import Iterator, Sequence
from typing import Any

from retool_jax.chat.tokenizer import encode_text
from retool_jax.rollout.agentic import ChatClient
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

__all__ = ["ServeBackend", "ServeSettings"]


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
    bound = self.settings.max_pending
    if bound is not None and self.pending + n > bound:
      raise APIError(
        429,
        f"the server is busy ({self.pending} sequences in flight, at most {bound}); retry later",
        code="rate_limit_exceeded",
      )
    self.pending += n
    try:
      yield
    finally:
      self.pending -= n

  # ---- chat --------------------------------------------------------------------------------------

  async def chat(self, req: ChatCompletionRequest, session: str | None = None) -> dict[str, Any]:
    """A `chat.completion` object for the request (on the session's recorder when `session` is given)."""
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

    async def one(i: int) -> tuple[dict[str, Any], int, int]:
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
      return (
        await self._chat_choice(i, reply, client, req),
        client.last_prompt_tokens,
        len(result.output_ids) if result else 0,
      )

    with self.admit(req.n):
      done = await asyncio.gather(*(one(i) for i in range(req.n)))
    return {
      "id": new_id("chatcmpl"),
      "object": "chat.completion",
      "created": now(),
      "model": self.model_name,
      "choices": [choice for choice, _, _ in done],
      "usage": _usage(done[0][1], sum(c for _, _, c in done)),
    }

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


def stream_chunks(response: dict[str, Any], include_usage: bool) -> Iterator[str]:
  """A finished `chat.completion` as the server-sent events of a streamed one: per choice the role, the content
  (with its log-probs), each tool call's id and name then its arguments, the finish reason; then the usage
  when asked for, then `[DONE]`."""
  base = {
    "id": response["id"],
    "object": "chat.completion.chunk",
    "created": response["created"],
    "model": response["model"],
  }

  def event(choices: list[dict], **extra: Any) -> str:
    return f"data: {json.dumps(base | {'choices': choices} | extra, ensure_ascii=False)}\n\n"

  for c in response["choices"]:
    i, m = c["index"], c["message"]
    yield event(
      [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
    )
    if m.get("content"):
      yield event(
        [{"index": i, "delta": {"content": m["content"]}, "logprobs": c["logprobs"], "finish_reason": None}]
      )
    for k, call in enumerate(m.get("tool_calls", ())):
      head = {
        "index": k,
        "id": call["id"],
        "type": "function",
        "function": {"name": call["function"]["name"], "arguments": ""},
      }
      yield event([{"index": i, "delta": {"tool_calls": [head]}, "logprobs": None, "finish_reason": None}])
      args = {"index": k, "function": {"arguments": call["function"]["arguments"]}}
      yield event([{"index": i, "delta": {"tool_calls": [args]}, "logprobs": None, "finish_reason": None}])
    yield event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": c["finish_reason"]}])
  if include_usage:
    yield event([], usage=response["usage"])
  yield "data: [DONE]\n\n"


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
