"""The tool registry: schemas for the chat template, the Qwen3 system block, and safe dispatch."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from retool_jax.tools.base import Tool, ToolResult, run_coroutine_sync

# The text the Qwen3 chat template writes around the tool list in the system turn.
_BLOCK_HEAD = (
  "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_BLOCK_TAIL = (
  "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
  "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
  "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>"
)


class ToolRegistry:
  """An ordered set of tools that the model may call by name."""

  def __init__(self, tools: Iterable[Tool] = ()):
    self._tools: dict[str, Tool] = {}
    for t in tools:
      self.register(t)

  def register(self, tool: Tool, *, replace: bool = False) -> Tool:
    if not isinstance(tool, Tool):
      raise TypeError(f"expected a Tool, got {type(tool).__name__} (declare functions with @tool)")
    if tool.name in self._tools and not replace:
      raise ValueError(f"a tool named {tool.name!r} is already registered")
    self._tools[tool.name] = tool
    return tool

  def register_json(self, spec: dict[str, Any], fn: Callable[..., Any]) -> Tool:
    return self.register(Tool.from_json_schema(spec, fn))

  def get(self, name: str) -> Tool | None:
    return self._tools.get(name)

  def names(self) -> list[str]:
    return list(self._tools)

  def __contains__(self, name: object) -> bool:
    return name in self._tools

  def __len__(self) -> int:
    return len(self._tools)

  def __iter__(self):
    return iter(self._tools.values())

  def subset(self, names: Iterable[str]) -> ToolRegistry:
    """A registry with only the named tools, in the given order."""
    missing = [n for n in names if n not in self._tools]
    if missing:
      raise KeyError(f"unknown tool(s): {', '.join(missing)}; available: {', '.join(self._tools)}")
    return ToolRegistry(self._tools[n] for n in names)

  def schemas(self) -> list[dict[str, Any]]:
    """OpenAI-style tool list, as ``tokenizer.apply_chat_template(..., tools=...)`` takes it."""
    return [t.schema() for t in self._tools.values()]

  def render_system_block(self) -> str:
    """The tools section of the system turn exactly as the Qwen3 chat template renders it."""
    lines = "".join("\n" + json.dumps(s, ensure_ascii=False) for s in self.schemas())
    return _BLOCK_HEAD + lines + _BLOCK_TAIL

  async def call(self, name: str, arguments: dict[str, Any] | str | None) -> ToolResult:
    """Runs a tool call; never raises: problems come back as a failed result the model can read."""
    start = time.monotonic()
    tool = self._tools.get(name) if isinstance(name, str) else None
    if tool is None:
      available = ", ".join(self._tools) or "none"
      return ToolResult(f"Error: unknown tool {name!r}. Available tools: {available}", False, "unknown_tool")
    if arguments is None:
      arguments = {}
    if isinstance(arguments, str):
      try:
        arguments = json.loads(arguments) if arguments.strip() else {}
      except json.JSONDecodeError as e:
        return ToolResult(
          f"Error: invalid arguments for {name}: not valid JSON ({e.msg} at position {e.pos})",
          False,
          "invalid_arguments",
        )
    try:
      result = await tool.run(arguments)
    except Exception as e:  # noqa: BLE001  (Tool.run already catches; this guards subclasses)
      result = ToolResult(f"Error: {name} failed: {type(e).__name__}: {e}", False, "error")
    if not result.elapsed_s:
      result = ToolResult(result.output, result.ok, result.status, time.monotonic() - start)
    return result

  def call_sync(self, name: str, arguments: dict[str, Any] | str | None) -> ToolResult:
    return run_coroutine_sync(self.call(name, arguments))
