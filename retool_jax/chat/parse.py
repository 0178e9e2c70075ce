"""Tool-call parsing of generated text. Never raises: every problem becomes an error the model can read.

Formats, found in text order:

* ``tool_call`` - ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks, several per turn,
  read as SGLang's ``qwen25`` parser reads them: text before the first block (stripped) is normal content;
  each body, whitespace-stripped, is JSON with ``name`` and ``parameters`` or ``arguments`` (``parameters``
  first when it is non-empty), or a list of such objects. Deliberate differences: a problem SGLang skips
  silently (malformed JSON, an unknown tool) is an error here; the newlines around the body are optional;
  ``arguments`` written as a JSON-encoded string are decoded. An unterminated last block is incomplete.
  A tag named in prose (``write a <tool_call> block``) is text, as it is for SGLang: see
  :func:`opens_tool_call`.
* ``code`` - ReTool ``<code>```python ... ```</code>`` blocks; the Markdown fences are stripped and the code
  becomes a call of the code tool (several fenced blocks in one cell run in order, as one program).
* ``markdown`` (optional) - bare ```` ```python ... ``` ```` blocks outside the other two.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any, Union

from retool_jax.chat.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

CODE_TOOL = "code_interpreter"
CODE_ARGUMENT = "code"
FORMATS = ("tool_call", "code", "markdown")
DEFAULT_FORMATS = ("tool_call", "code")
CALL_SYNTAX = '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
PYTHON_FENCE_LANGUAGES = ("", "python", "py", "python3")

_OPENERS = {
  "tool_call": re.compile(re.escape(TOOL_CALL_OPEN)),
  "code": re.compile(re.escape("<code>")),
  "markdown": re.compile(r"```(?:python3?|py)[ \t]*\n"),
}
_CLOSERS = {"tool_call": TOOL_CALL_CLOSE, "code": "</code>", "markdown": "```"}
_BODY_START = re.compile(r"[ \t]*(?:[\r\n{\[]|\Z)")
# One fenced block: its language, then its code up to the closing fence (or the end of the text).
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*(?:\n|\Z)(.*?)(?:\n?```|\Z)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """One parsed call; `span` is its block's character range in the parsed text."""

  name: str
  arguments: dict[str, Any]
  format: str = "tool_call"
  span: tuple[int, int] = (0, 0)


@dataclasses.dataclass(frozen=True)
class CallError:
  """A block that could not become a call; `message` is written for the model to read."""

  message: str
  format: str = "tool_call"
  span: tuple[int, int] = (0, 0)


@dataclasses.dataclass(frozen=True)
class ParseResult:
  """Calls and errors in text order (`items`), plus the normal content before the first block."""

  content: str
  items: tuple[Union[ToolCall, CallError], ...] = ()

  @property
  def calls(self) -> list[ToolCall]:
    return [item for item in self.items if isinstance(item, ToolCall)]

  @property
  def errors(self) -> list[str]:
    return [item.message for item in self.items if isinstance(item, CallError)]

  @property
  def found(self) -> bool:
    """Whether the text contained any call block, valid or not."""
    return bool(self.items)


def opens_tool_call(text: str, index: int) -> bool:
  """Whether the ``<tool_call>`` at ``text[index]`` opens a call block rather than naming the tag in prose.

  It does when a body can start right after it (a line break, ``{`` or ``[``, spaces or tabs between, or the
  end of the text: a call cut short), or when ``</tool_call>`` follows before any other ``<tool_call>``.
  """
  after = index + len(TOOL_CALL_OPEN)
  if _BODY_START.match(text, after):
    return True
  close = text.find(TOOL_CALL_CLOSE, after)
  reopen = text.find(TOOL_CALL_OPEN, after)
  return close != -1 and (reopen == -1 or close < reopen)


def parse_tool_calls(
  text: str,
  registry: Any = None,
  *,
  formats: Sequence[str] = DEFAULT_FORMATS,
  bare_python: bool = False,
  code_tool: str = CODE_TOOL,
) -> ParseResult:
  """Finds tool calls in generated `text`.

  With a `registry` (anything with `.get(name) -> tool | None` and `tool.validate(arguments) -> str | None`),
  unknown tools and invalid arguments become errors instead of calls. `bare_python=True` adds the
  ``markdown`` format. `<code>` and Markdown blocks call `code_tool` with ``{"code": <the code>}``.
  """
  if not isinstance(text, str):
    return ParseResult("", (CallError(f"expected generated text, got {type(text).__name__}"),))
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown:
    return ParseResult(text, (CallError(f"unknown call formats {unknown}; expected some of {FORMATS}"),))
  formats = [f for f in FORMATS if f in formats or (f == "markdown" and bare_python)]

  items: list[Union[ToolCall, CallError]] = []
  content: str | None = None
  pos = 0
  while True:
    found = [(m.start(), m.end(), fmt) for fmt in formats if (m := _OPENERS[fmt].search(text, pos))]
    if not found:
      break
    start, body_start, fmt = min(found)
    if fmt == "tool_call" and not opens_tool_call(text, start):
      pos = body_start
      continue
    if content is None:
      content = text[:start].strip()
    close = text.find(_CLOSERS[fmt], body_start)
    if close == -1:
      items.append(CallError(_incomplete(fmt), fmt, (start, len(text))))
      break
    end = close + len(_CLOSERS[fmt])
    body = text[body_start:close]
    for item in _parse_block(fmt, body, len(items) + 1, code_tool):
      item = dataclasses.replace(item, span=(start, end))
      items.append(_check(item, registry) if isinstance(item, ToolCall) else item)
    pos = end
  return ParseResult(text if content is None else content, tuple(items))


def _incomplete(fmt: str) -> str:
  closer = _CLOSERS[fmt]
  return f"Error: incomplete tool call: the {fmt} block was never closed with {closer!r}."


def _parse_block(fmt: str, body: str, number: int, code_tool: str) -> list[Union[ToolCall, CallError]]:
  if fmt == "tool_call":
    return _parse_json_calls(body, number)
  code = body if fmt == "markdown" else _strip_fence(body)
  if isinstance(code, CallError):
    return [dataclasses.replace(code, format=fmt)]
  if not code.strip():
    return [CallError(f"Error: code block {number} is empty.", fmt)]
  return [ToolCall(code_tool, {CODE_ARGUMENT: code.strip("\n")}, fmt)]


def _strip_fence(body: str) -> str | CallError:
  """The code of a ``<code>`` body: the body itself, or the code of its fenced blocks joined in order."""
  body = body.strip()
  if not body.startswith("```"):
    return body
  blocks = []
  for match in _FENCE.finditer(body):
    language, code = match.group(1), match.group(2)
    if language.lower() not in PYTHON_FENCE_LANGUAGES:
      return CallError(f"Error: code blocks must be Python; got a ```{language} block.")
    blocks.append(code.strip("\n"))
  return "\n".join(blocks)


def _parse_json_calls(body: str, number: int) -> list[Union[ToolCall, CallError]]:
  try:
    payload = json.loads(body.strip())
  except RecursionError:
    return [CallError(f"Error: tool call {number} is nested too deeply to parse.")]
  except ValueError as e:
    return [CallError(f"Error: tool call {number} is not valid JSON ({e}). Write calls as {CALL_SYNTAX}")]
  objects = payload if isinstance(payload, list) else [payload]
  if not objects:
    return [CallError(f"Error: tool call {number} is an empty list. Write calls as {CALL_SYNTAX}")]
  return [_call_from_object(obj, number) for obj in objects]


def _call_from_object(obj: Any, number: int) -> Union[ToolCall, CallError]:
  if not isinstance(obj, dict):
    return CallError(
      f"Error: tool call {number} must be a JSON object with \"name\" and \"arguments\", "
      f"got {type(obj).__name__}. Write calls as {CALL_SYNTAX}"
    )
  name = obj.get("name")
  if not isinstance(name, str) or not name.strip():
    return CallError(f"Error: tool call {number} has no \"name\" string. Write calls as {CALL_SYNTAX}")
  if obj.get("parameters") or "arguments" not in obj:
    arguments = obj.get("parameters")
  else:
    arguments = obj["arguments"]
  if arguments is None:
    arguments = {}
  if isinstance(arguments, str):
    try:
      arguments = json.loads(arguments) if arguments.strip() else {}
    except (ValueError, RecursionError):
      return CallError(f"Error: the arguments of tool call {number} ({name}) are a string that is not JSON.")
  if not isinstance(arguments, dict):
    return CallError(
      f"Error: the arguments of tool call {number} ({name}) must be a JSON object, got {type(arguments).__name__}."
    )
  return ToolCall(name, arguments)


def _check(call: ToolCall, registry: Any) -> Union[ToolCall, CallError]:
  if registry is None:
    return call
  try:
    tool = registry.get(call.name)
    if tool is None:
      available = ", ".join(registry.names()) if hasattr(registry, "names") else ""
      hint = f" Available tools: {available}." if available else ""
      return CallError(f"Error: unknown tool {call.name!r}.{hint}", call.format, call.span)
    problem = tool.validate(call.arguments)
  except Exception as e:  # a faulty validator must not take the rollout down
    problem = f"validation failed ({type(e).__name__}: {e})"
  if problem:
    return CallError(f"Error: bad arguments for tool {call.name!r}: {problem}", call.format, call.span)
  return call
