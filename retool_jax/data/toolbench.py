"""ToolBench-style records (an API list plus a ReAct conversation) -> `ChatExample` with native tool calls.

Accepted rows: `{"conversations": [{"from", "value"}...], "api_list": [...]}` (raw ToolBench API entries with
`api_name`, `tool_name`, `api_description`, `required_parameters`, `optional_parameters`) or with `"tools"`
(schemas, as a list or JSON string). Assistant turns `Thought: ...\\nAction: <fn>\\nAction Input: {json}` become
tool calls, `function` turns become `tool` messages, and `Action: Finish` with `give_answer` becomes the final
answer. ToolBench's own system prompt (the ReAct instructions) is dropped: the chat template shows the tools.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from retool_jax.data.chat_sft import clean_messages, clean_tools
from retool_jax.data.io import field, read_rows
from retool_jax.data.records import ChatExample

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "function": "tool", "tool": "tool"}
_TYPES = {
  "string": "string",
  "number": "number",
  "integer": "integer",
  "boolean": "boolean",
  "array": "array",
  "object": "object",
  "enum": "string",
  "date": "string",
  "time": "string",
  "float": "number",
}
_REACT = re.compile(
  r"(?:Thought:\s*(?P<thought>.*?)\s*)?Action:\s*(?P<action>[^\n]+?)\s*\nAction Input:\s*(?P<input>.*)\Z",
  re.DOTALL,
)


def function_name(api_name: str, tool_name: str) -> str:
  """ToolBench's function naming: `<api>_for_<tool>`, lower-case, non-alphanumerics as `_`, at most 64 chars."""

  def norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")

  return f"{norm(api_name)}_for_{norm(tool_name)}"[:64]


def api_schema(api: Mapping[str, Any], where: str) -> dict[str, Any]:
  """One ToolBench `api_list` entry as an OpenAI-style function schema."""
  name = function_name(field(api, "api_name", where), field(api, "tool_name", where))
  properties, required = {}, []
  for group in ("required_parameters", "optional_parameters"):
    for p in api.get(group) or []:
      if not isinstance(p, Mapping) or not isinstance(p.get("name"), str):
        raise ValueError(f"{where}: {group} entries need a 'name'")
      prop = {"type": _TYPES.get(str(p.get("type", "string")).lower(), "string")}
      if p.get("description"):
        prop["description"] = p["description"]
      properties[p["name"]] = prop
      if group == "required_parameters":
        required.append(p["name"])
  description = api.get("api_description") or f"{api['api_name']} of the {api['tool_name']} tool"
  parameters = {"type": "object", "properties": properties, "required": required}
  return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def _assistant(value: str, where: str) -> tuple[dict[str, Any], bool]:
  """An assistant ReAct turn -> (message, is_final)."""
  match = _REACT.search(value)
  if match is None:
    return {"role": "assistant", "content": value.strip()}, True
  thought, action = (match.group("thought") or "").strip(), match.group("action").strip()
  raw = match.group("input").strip()
  try:
    arguments = json.loads(raw) if raw else {}
  except ValueError as e:
    raise ValueError(f"{where}: Action Input of {action!r} is not JSON ({e}): {raw[:80]!r}") from e
  if not isinstance(arguments, dict):
    raise ValueError(f"{where}: Action Input of {action!r} must be a JSON object")
  if action == "Finish" and arguments.get("return_type") == "give_answer":
    return {"role": "assistant", "content": str(arguments.get("final_answer", "")).strip()}, True
  call = {"type": "function", "function": {"name": action, "arguments": arguments}}
  return {"role": "assistant", "content": thought, "tool_calls": [call]}, False


def convert_toolbench_record(row: Mapping[str, Any], *, where: str = "record") -> ChatExample:
  turns = field(row, "conversations", where, list)
  if row.get("api_list") is not None:
    apis = field(row, "api_list", where, list)
    tools = [api_schema(api, f"{where}: api_list[{k}]") for k, api in enumerate(apis)]
  else:
    tools = clean_tools(row.get("tools"), where) or []
  messages: list[dict[str, Any]] = []
  finished = False
  for j, turn in enumerate(turns):
    turn_where = f"{where}: conversations[{j}]"
    if not isinstance(turn, Mapping):
      raise ValueError(f"{turn_where}: must be an object with 'from' and 'value'")
    role = ROLES.get(turn.get("from") or turn.get("role"))
    value = turn.get("value", turn.get("content"))
    if role is None or not isinstance(value, str):
      raise ValueError(f"{turn_where}: needs 'from' in {sorted(ROLES)} and a string 'value'")
    if role == "system":
      continue
    if role == "assistant":
      message, finished = _assistant(value, turn_where)
      messages.append(message)
    else:
      messages.append({"role": role, "content": value})
  called = {c["function"]["name"] for m in messages for c in m.get("tool_calls", [])}
  names = {t["function"]["name"] for t in tools}
  if "Finish" in called and "Finish" not in names:
    tools.append(FINISH_SCHEMA)
  metadata = {"source": "toolbench", "finished": finished}
  if row.get("query_id") is not None or row.get("id") is not None:
    metadata["id"] = row.get("query_id", row.get("id"))
  return ChatExample(clean_messages(messages, where), tools or None, metadata)


FINISH_SCHEMA = {
  "type": "function",
  "function": {
    "name": "Finish",
    "description": "Finish the task: give the final answer, or give up and restart.",
    "parameters": {
      "type": "object",
      "properties": {
        "return_type": {"type": "string", "enum": ["give_answer", "give_up_and_restart"]},
        "final_answer": {"type": "string"},
      },
      "required": ["return_type"],
    },
  },
}


def load_toolbench(path: str | os.PathLike, *, limit: int | None = None) -> list[ChatExample]:
  """Loads ToolBench-style rows as `ChatExample` records with native tool calls."""
  return [
    convert_toolbench_record(row, where=f"{path}: row {i}") for i, row in enumerate(read_rows(path, limit=limit))
  ]
