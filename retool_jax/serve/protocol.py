"""The OpenAI wire format: request models (validated by pydantic), errors, and the pieces of a response."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import pydantic

__all__ = [
  "APIError",
  "ChatCompletionRequest",
  "CompletionRequest",
  "error_body",
  "new_id",
  "normalize_messages",
]

# Parameters the engine cannot honour: a request that sets one to anything but its neutral value is refused,
# rather than silently answered as if it had not been set.
UNSUPPORTED = {
  "frequency_penalty": (None, 0, 0.0),
  "presence_penalty": (None, 0, 0.0),
  "logit_bias": (None, {}),
  "response_format": (None, {"type": "text"}),
  "functions": (None,),
  "function_call": (None,),
  "parallel_tool_calls": (None, True),
}
MAX_N = 16


class APIError(Exception):
  """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

  TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error", 503: "server_error"}

  def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code

  def body(self) -> dict[str, Any]:
    return error_body(self.message, self.TYPES.get(self.status, "server_error"), self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
  return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
  return int(time.time())


class _Request(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="allow")

  model: str
  temperature: float | None = pydantic.Field(None, ge=0, le=2)
  top_p: float | None = pydantic.Field(None, gt=0, le=1)
  top_k: int | None = None  # an extension, as in vLLM and SGLang: -1 is off
  n: int = pydantic.Field(1, ge=1, le=MAX_N)
  seed: int | None = None
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: dict[str, Any] | None = None

  @pydantic.field_validator("top_k")
  @classmethod
  def _top_k(cls, v: int | None) -> int | None:
    if v is not None and (v == 0 or v < -1):
      raise ValueError("must be -1 (off) or >= 1")
    return v

  @pydantic.field_validator("stop")
  @classmethod
  def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
    stops = [v] if isinstance(v, str) else v or []
    if len(stops) > 4 or any(not s for s in stops):
      raise ValueError("must be at most 4 non-empty strings")
    return v

  def stops(self) -> tuple[str, ...]:
    return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

  def check_supported(self) -> None:
    for name, neutral in UNSUPPORTED.items():
      value = (self.model_extra or {}).get(name)
      if value not in neutral:
        raise APIError(400, f"{name}={value!r} is not supported by this server", param=name)

  def include_usage(self) -> bool:
    return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatCompletionRequest(_Request):
  messages: list[dict[str, Any]] = pydantic.Field(min_length=1)
  tools: list[dict[str, Any]] | None = None
  tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
  max_tokens: int | None = pydantic.Field(None, ge=1)
  max_completion_tokens: int | None = pydantic.Field(None, ge=1)
  logprobs: bool = False
  top_logprobs: int | None = pydantic.Field(None, ge=0, le=20)

  def max_new_tokens(self) -> int | None:
    return self.max_completion_tokens or self.max_tokens

  def check(self) -> None:
    """Cross-field rules pydantic's per-field checks do not cover (each error names its field)."""
    self.check_supported()
    if self.top_logprobs and not self.logprobs:
      raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    names = []
    for i, tool in enumerate(self.tools or ()):
      fn = tool.get("function")
      if tool.get("type", "function") != "function" or not isinstance(fn, dict) or not fn.get("name"):
        raise APIError(
          400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}", param=f"tools.{i}"
        )
      names.append(fn["name"])
    choice = self.tool_choice
    if isinstance(choice, dict):
      name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
      if choice.get("type") != "function" or not name:
        raise APIError(
          400, "tool_choice must be 'auto', 'none', 'required' or a function by name", param="tool_choice"
        )
      if name not in names:
        raise APIError(
          400, f"tool_choice names {name!r}, which is not among the request's tools", param="tool_choice"
        )
    elif choice == "required" and not names:
      raise APIError(400, "tool_choice='required' needs tools", param="tool_choice")


class CompletionRequest(_Request):
  prompt: str | list[str] | list[int] | list[list[int]]
  max_tokens: int | None = pydantic.Field(16, ge=1)
  logprobs: int | None = pydantic.Field(None, ge=0, le=20)
  echo: bool = False
  suffix: str | None = None

  def check(self) -> None:
    self.check_supported()
    if self.echo:
      raise APIError(400, "echo=true is not supported by this server", param="echo")
    if self.suffix:
      raise APIError(400, "suffix is not supported by this server", param="suffix")
    if isinstance(self.prompt, list) and not self.prompt:
      raise APIError(400, "prompt is empty", param="prompt")

  def prompts(self) -> list[str | list[int]]:
    """The prompts, each a text or a list of token ids."""
    p = self.prompt
    if isinstance(p, str):
      return [p]
    if all(isinstance(x, int) for x in p):
      return [list(p)]
    return list(p)


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Messages as the chat template reads them: content given as a list of text parts joined into one string
  (other part types refused), `null` content as an empty string where a call carries the turn."""
  out = []
  for i, m in enumerate(messages):
    m = dict(m)
    content = m.get("content")
    if isinstance(content, list):
      texts = []
      for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
          raise APIError(
            400, f"messages[{i}].content[{j}]: only text parts are supported", param=f"messages.{i}.content.{j}"
          )
        texts.append(part["text"])
      m["content"] = "".join(texts)
    elif content is not None and not isinstance(content, str):
      raise APIError(
        400, f"messages[{i}].content must be a string, a list of text parts or null", param=f"messages.{i}.content"
      )
    if m.get("role") == "assistant" and m.get("content") is None:
      m["content"] = ""
    out.append(m)
  return out
