"""A tool: a name, a description, a JSON schema for its arguments and an (async) callable."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import inspect
import re
import time
import types
import typing
from collections.abc import Callable
from typing import Any

import jsonschema

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


@dataclasses.dataclass(frozen=True)
class ToolResult:
  """What a tool call gives back to the model.

  ``status`` is ``ok``, a sandbox status (``error``, ``timeout``, ``memory``, ``killed``,
  ``policy``), or ``invalid_arguments`` / ``unknown_tool`` for a malformed call.
  """

  output: str
  ok: bool
  status: str
  elapsed_s: float = 0.0


class Tool:
  """A callable the model can invoke, described by an OpenAI-style function schema."""

  def __init__(
    self, name: str, description: str, parameters: dict[str, Any], fn: Callable[..., Any], *, strict: bool = True
  ):
    if not isinstance(name, str) or not _NAME.match(name):
      raise ValueError(f"tool name {name!r} must match {_NAME.pattern}")
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
      raise ValueError(f"tool {name!r}: parameters must be a JSON schema with \"type\": \"object\"")
    try:
      jsonschema.Draft202012Validator.check_schema(parameters)
    except jsonschema.SchemaError as e:
      raise ValueError(f"tool {name!r}: invalid parameters schema: {e.message}") from None
    if not callable(fn):
      raise TypeError(f"tool {name!r}: fn must be callable, got {type(fn).__name__}")
    self.name = name
    self.description = description
    self.parameters = parameters
    self.fn = fn
    self.strict = strict
    self._validator = jsonschema.Draft202012Validator(parameters)

  @classmethod
  def from_json_schema(cls, spec: dict[str, Any], fn: Callable[..., Any]) -> Tool:
    """From ``{"type": "function", "function": {...}}`` or ``{"name", "description", "parameters"}``."""
    if not isinstance(spec, dict):
      raise TypeError(f"tool spec must be a dict, got {type(spec).__name__}")
    body = spec.get("function", spec) if spec.get("type") == "function" else spec
    missing = [k for k in ("name", "parameters") if k not in body]
    if missing:
      raise ValueError(f"tool spec {body.get('name', '?')!r} is missing field(s): {', '.join(missing)}")
    return cls(body["name"], body.get("description", ""), body["parameters"], fn)

  def schema(self) -> dict[str, Any]:
    """The entry for ``tools=[...]`` of a chat template."""
    return {
      "type": "function",
      "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
    }

  def validate(self, arguments: Any) -> str | None:
    """None when ``arguments`` fit the schema, else a short error the model can read."""
    if not isinstance(arguments, dict):
      return f"arguments must be a JSON object, got {_json_type(arguments)}"
    if self.strict and "additionalProperties" not in self.parameters:
      known = self.parameters.get("properties", {})
      extra = [k for k in arguments if k not in known]
      if extra:
        expected = ", ".join(known) or "none"
        return f"unexpected argument {extra[0]!r} (expected: {expected})"
    error = min(self._validator.iter_errors(arguments), key=lambda e: (len(e.path), e.validator), default=None)
    return None if error is None else _describe(error)

  async def run(self, arguments: dict[str, Any]) -> ToolResult:
    """Validates, calls, and wraps the outcome; errors become a failed result, not an exception."""
    start = time.monotonic()
    problem = self.validate(arguments)
    if problem is not None:
      return ToolResult(f"Error: invalid arguments for {self.name}: {problem}", False, "invalid_arguments")
    try:
      if inspect.iscoroutinefunction(self.fn):
        value = await self.fn(**arguments)
      else:  # a plain function runs in a thread, so a slow one does not stall other trajectories
        value = await asyncio.to_thread(self.fn, **arguments)
        if inspect.isawaitable(value):
          value = await value
    except (Exception, SystemExit) as e:  # noqa: BLE001  (the model reads the failure)
      return ToolResult(
        f"Error: {self.name} failed: {type(e).__name__}: {e}", False, "error", time.monotonic() - start
      )
    return _as_result(value, time.monotonic() - start)

  def __repr__(self) -> str:
    return f"Tool({self.name!r})"


def _as_result(value: Any, elapsed: float) -> ToolResult:
  if isinstance(value, ToolResult):
    return value
  status = getattr(value, "status", None)
  if isinstance(status, str) and hasattr(value, "output"):  # a sandbox ExecResult
    return ToolResult(value.output, status == "ok", status, getattr(value, "elapsed_s", elapsed))
  if not isinstance(value, str):
    value = "" if value is None else str(value)
  return ToolResult(value, True, "ok", elapsed)


def _json_type(value: Any) -> str:
  for py, name in (
    (bool, "boolean"),
    (int, "integer"),
    (float, "number"),
    (str, "string"),
    (list, "array"),
    (dict, "object"),
  ):
    if isinstance(value, py):
      return name
  return "null" if value is None else type(value).__name__


def _describe(error: jsonschema.ValidationError) -> str:
  where = "".join(
    f"[{p!r}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(error.absolute_path)
  )
  subject = f"argument {where!r}" if where else "arguments"
  kind, expected = error.validator, error.validator_value
  if kind == "required":
    missing = [k for k in expected if k not in error.instance]
    return f"missing required argument {missing[0]!r}"
  if kind == "type":
    wanted = " or ".join(expected) if isinstance(expected, list) else expected
    return f"{subject} must be {wanted}, got {_json_type(error.instance)}"
  if kind == "enum":
    options = ", ".join(repr(v) for v in expected)
    return f"{subject} must be one of {options}, got {error.instance!r}"
  return f"{subject}: {error.message}"


# -- declaring a tool from a typed, documented function --------------------------------------


def _type_schema(hint: Any, where: str) -> dict[str, Any]:
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if hint in _JSON_TYPES:
    return {"type": _JSON_TYPES[hint]}
  if origin is typing.Literal:
    kinds = {_JSON_TYPES.get(type(a)) for a in args}
    schema = {"type": kinds.pop()} if len(kinds) == 1 and None not in kinds else {}
    return {**schema, "enum": list(args)}
  if origin in (list, tuple, set, frozenset) or hint in (tuple, set):
    item = args[0] if args else None
    return {"type": "array", **({"items": _type_schema(item, where)} if item is not None else {})}
  if origin is dict:
    return {"type": "object"}
  if origin in (typing.Union, types.UnionType):
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:
      return _type_schema(options[0], where)
    return {"anyOf": [_type_schema(a, where) for a in options]}
  if isinstance(hint, type) and issubclass(hint, enum.Enum):
    return {"type": "string", "enum": [m.value for m in hint]}
  if hint is Any:
    return {}
  raise TypeError(f"{where}: cannot derive a JSON schema from type {hint!r}")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
  """(description, {param: text}) from a Google-style docstring."""
  doc = inspect.cleandoc(doc or "")
  sections = re.split(
    r"\n(?=(?:Args|Arguments|Parameters|Returns|Raises|Yields|Example|Examples|Note):\s*\n)", doc
  )
  description = "\n\n".join(" ".join(p.split()) for p in sections[0].strip().split("\n\n"))
  params: dict[str, str] = {}
  for section in sections[1:]:
    head, _, body = section.partition("\n")
    if head.strip().rstrip(":") not in ("Args", "Arguments", "Parameters"):
      continue
    current = None
    for line in body.splitlines():
      m = re.match(r"^\s{0,8}(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
      if m and (current is None or len(line) - len(line.lstrip()) <= 4):
        current = m.group(1).lstrip("*")
        params[current] = m.group(2).strip()
      elif current and line.strip():
        params[current] = (params[current] + " " + line.strip()).strip()
  return description, params


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None) -> Any:
  """Declares a tool from a typed, documented function: ``@tool`` or ``@tool(name=...)``.

  The parameters' JSON schema comes from the type hints, their descriptions and the tool's
  description from the docstring (Google style ``Args:``); parameters without a default are
  required.
  """

  def build(f: Callable[..., Any]) -> Tool:
    where = f"tool {name or f.__name__!r}"
    hints = typing.get_type_hints(f)
    summary, docs = _parse_docstring(f.__doc__ or "")
    properties: dict[str, Any] = {}
    required = []
    for pname, param in inspect.signature(f).parameters.items():
      if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
        raise TypeError(f"{where}: *args / **kwargs cannot be described by a schema")
      if pname not in hints:
        raise TypeError(f"{where}: parameter {pname!r} needs a type hint")
      prop = _type_schema(hints[pname], f"{where}, parameter {pname!r}")
      if pname in docs:
        prop["description"] = docs[pname]
      properties[pname] = prop
      if param.default is param.empty:
        required.append(pname)
    parameters = {"type": "object", "properties": properties, "required": required}
    return Tool(name or f.__name__, description if description is not None else summary, parameters, f)

  return build(fn) if fn is not None else build


def run_coroutine_sync(coro: Any) -> Any:
  """Runs a coroutine to completion from sync code, even when this thread has a running loop."""
  try:
    asyncio.get_running_loop()
  except RuntimeError:
    return asyncio.run(coro)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(asyncio.run, coro).result()
