"""Generic chat SFT records `{"messages", "tools"}` and DPO pairs `{"prompt", "chosen", "rejected"}`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from retool_jax.chat.render import check_messages
from retool_jax.data.io import drop_nulls, field, maybe_json, read_rows
from retool_jax.data.records import ChatExample, PreferencePair

MESSAGE_KEYS = ("role", "content", "tool_calls", "reasoning_content", "name", "tool_call_id")


def clean_tool_call(call: Any, where: str) -> dict[str, Any]:
  """An OpenAI-style tool call with its arguments decoded to a dict (the template renders them as JSON)."""
  if not isinstance(call, Mapping):
    raise ValueError(f"{where}: a tool call must be an object, got {type(call).__name__}")
  function = call.get("function", call)
  if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
    raise ValueError(f"{where}: a tool call needs function.name")
  arguments = maybe_json(function.get("arguments"), f"{where}: arguments of {function['name']!r}") or {}
  if not isinstance(arguments, Mapping):
    raise ValueError(f"{where}: arguments of {function['name']!r} must be an object")
  return {"type": "function", "function": {"name": function["name"], "arguments": drop_nulls(dict(arguments))}}


def clean_messages(messages: Any, where: str) -> list[dict[str, Any]]:
  """Validated plain messages: known keys only, tool-call arguments as dicts, nulls added by Arrow removed."""
  if not isinstance(messages, list):
    raise ValueError(f"{where}: 'messages' must be a list, got {type(messages).__name__}")
  out = []
  for j, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise ValueError(f"{where}: messages[{j}] must be an object")
    message = {k: m[k] for k in MESSAGE_KEYS if m.get(k) is not None}
    message.setdefault("content", "")
    if "tool_calls" in message:
      message["tool_calls"] = [clean_tool_call(c, f"{where}: messages[{j}]") for c in message["tool_calls"]]
    out.append(message)
  try:
    check_messages(out)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {e}") from e
  return out


def clean_tools(tools: Any, where: str) -> list[dict[str, Any]] | None:
  """Tool schemas (a list or a JSON string), each wrapped as `{"type": "function", "function": ...}`."""
  tools = maybe_json(tools, f"{where}: tools")
  if tools is None:
    return None
  if not isinstance(tools, list):
    raise ValueError(f"{where}: 'tools' must be a list of schemas, got {type(tools).__name__}")
  out = []
  for k, schema in enumerate(drop_nulls(tools)):
    if not isinstance(schema, Mapping):
      raise ValueError(f"{where}: tools[{k}] must be an object")
    function = schema.get("function", schema)
    if not isinstance(function.get("name"), str):
      raise ValueError(f"{where}: tools[{k}] has no function name")
    out.append({"type": "function", "function": dict(function)})
  return out or None


def load_chat_sft(path: str | os.PathLike, *, limit: int | None = None) -> list[ChatExample]:
  """Loads `{"messages": [...], "tools": [...] | JSON string | absent}` rows as `ChatExample` records."""
  examples = []
  for i, row in enumerate(read_rows(path, limit=limit)):
    where = f"{path}: row {i}"
    messages = clean_messages(field(row, "messages", where, list), where)
    if not any(m["role"] == "assistant" for m in messages):
      raise ValueError(f"{where}: no assistant turn to train on")
    metadata = {"source": str(path), "index": i}
    if isinstance(row.get("metadata"), Mapping):
      metadata.update(drop_nulls(row["metadata"]))
    examples.append(ChatExample(messages, clean_tools(row.get("tools"), where), metadata))
  return examples


def _side(value: Any, where: str, name: str, role: str) -> list[dict[str, Any]]:
  if isinstance(value, str):
    return [{"role": role, "content": value}]
  return clean_messages(value, f"{where}: {name}")


def _strip_prompt(side: list[dict[str, Any]], prompt: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Some DPO sets repeat the prompt inside chosen/rejected; keep only the continuation."""
  n = len(prompt)
  return side[n:] if len(side) > n and side[:n] == list(prompt) else side


def load_preference_pairs(path: str | os.PathLike, *, limit: int | None = None) -> list[PreferencePair]:
  """Loads DPO rows `{"prompt", "chosen", "rejected"}` (strings or message lists; optional `tools`)."""
  pairs = []
  for i, row in enumerate(read_rows(path, limit=limit)):
    where = f"{path}: row {i}"
    prompt = _side(field(row, "prompt", where, (str, list)), where, "prompt", "user")
    chosen = _strip_prompt(_side(field(row, "chosen", where, (str, list)), where, "chosen", "assistant"), prompt)
    rejected = _strip_prompt(
      _side(field(row, "rejected", where, (str, list)), where, "rejected", "assistant"), prompt
    )
    for name, side in (("chosen", chosen), ("rejected", rejected)):
      if not any(m["role"] == "assistant" for m in side):
        raise ValueError(f"{where}: {name} has no assistant turn")
    if chosen == rejected:
      raise ValueError(f"{where}: chosen and rejected are identical")
    tools = clean_tools(row.get("tools"), where)
    pairs.append(PreferencePair(prompt, chosen, rejected, tools, {"source": str(path), "index": i}))
  return pairs


def dumps_example(example: ChatExample) -> str:
  """One jsonl line in the `{"messages", "tools"}` schema `load_chat_sft` reads."""
  row = {"messages": example.messages, "tools": example.tools, "metadata": example.metadata}
  return json.dumps(row, ensure_ascii=False)
