"""ReTool-SFT records -> `ChatExample`, in the ReTool inline format or as `tool_calls` + `tool` messages.

A record is `{"messages": [user, assistant]}` where the assistant turn is one string interleaving reasoning,
`<code>```python ...```</code>` blocks, their `<interpreter>...</interpreter>` output and a final
`<answer>\\boxed{...}</answer>`. Either way the interpreter output is environment text and is never trained:

* ``inline`` keeps the turn as it is; `encode_sft` masks each `<interpreter>` span.
* ``tool_calls`` splits the turn at every executed code block into an assistant message with a
  `code_interpreter` call and a `tool` message with the output; code blocks without output stay text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from retool_jax.chat.observation import INTERPRETER_CLOSE, INTERPRETER_OPEN
from retool_jax.chat.parse import CODE_TOOL, parse_tool_calls
from retool_jax.data.io import field, read_rows
from retool_jax.data.records import ChatExample
from retool_jax.tools import default_registry

STYLES = ("inline", "tool_calls")
_EXECUTED_CODE = re.compile(
  rf"(?P<code><code>.*?</code>)\s*{re.escape(INTERPRETER_OPEN)}(?P<output>.*?){re.escape(INTERPRETER_CLOSE)}",
  re.DOTALL,
)


def code_tool_schema() -> dict[str, Any]:
  """The OpenAI-style schema of the code tool, as the tool registry publishes it."""
  for schema in default_registry().schemas():
    if schema.get("function", {}).get("name") == CODE_TOOL:
      return schema
  raise LookupError(f"the default tool registry has no {CODE_TOOL!r} tool")


def split_retool_turn(text: str) -> list[dict[str, Any]]:
  """One ReTool assistant turn -> alternating assistant (with a code tool call) and tool messages."""
  messages: list[dict[str, Any]] = []
  cursor = 0
  for match in _EXECUTED_CODE.finditer(text):
    parsed = parse_tool_calls(match.group("code"), formats=("code",))
    if not parsed.calls:  # an empty or non-Python block: keep it as text
      continue
    call = parsed.calls[0]
    messages.append(
      {
        "role": "assistant",
        "content": text[cursor : match.start()].strip(),
        "tool_calls": [{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}],
      }
    )
    messages.append({"role": "tool", "content": match.group("output").strip("\n")})
    cursor = match.end()
  rest = text[cursor:].strip()
  if rest or not messages:
    messages.append({"role": "assistant", "content": rest})
  return messages


def convert_retool_record(
  record: Mapping[str, Any],
  style: str = "inline",
  *,
  tools: list[dict[str, Any]] | None = None,
  where: str = "record",
) -> ChatExample:
  """A ReTool-SFT record -> `ChatExample` in `style` (``inline`` or ``tool_calls``).

  `tools` are the schemas shown with ``tool_calls`` (default: the registry's code tool).
  """
  if style not in STYLES:
    raise ValueError(f"unknown ReTool-SFT style {style!r}; expected one of {STYLES}")
  messages = field(record, "messages", where, list)
  roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages]
  if not roles or roles[-1] != "assistant" or any(r not in ("system", "user", "assistant") for r in roles):
    raise ValueError(
      f"{where}: messages must be user/system turns ending in one assistant turn, got roles {roles}"
    )
  for j, m in enumerate(messages):
    if not isinstance(m.get("content"), str):
      raise ValueError(f"{where}: messages[{j}].content must be a string")
  head = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
  answer = messages[-1]["content"]
  metadata = {"source": "retool_sft", "style": style, "code_blocks": answer.count("<code>")}
  if style == "inline":
    return ChatExample(head + [{"role": "assistant", "content": answer}], None, metadata)
  return ChatExample(head + split_retool_turn(answer), tools or [code_tool_schema()], metadata)


def load_retool_sft(
  path: str | os.PathLike,
  *,
  style: str = "inline",
  tools: list[dict[str, Any]] | None = None,
  limit: int | None = None,
) -> list[ChatExample]:
  """Loads ReTool-SFT rows (json/jsonl/parquet) as `ChatExample` records in `style`."""
  if style == "tool_calls" and tools is None:
    tools = [code_tool_schema()]
  return [
    convert_retool_record(row, style, tools=tools, where=f"{path}: row {i}")
    for i, row in enumerate(read_rows(path, limit=limit))
  ]
