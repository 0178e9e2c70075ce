"""Tools the model can call: a registry, the built-in tools, and the sandboxed interpreter they use.

from retool_jax.tools import default_registry
reg = default_registry()
reg.render_system_block()                      # the Qwen3 <tools> system block
reg.call_sync("code_interpreter", {"code": "print(2**10)"}).output   # '1024\\n'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from retool_jax.sandbox import default_sandbox, run_python
from retool_jax.tools.analysis import analyze_code
from retool_jax.tools.base import Tool, ToolResult, tool
from retool_jax.tools.calculator import calculator
from retool_jax.tools.code_tools import sandbox_tools
from retool_jax.tools.docs_search import search_docs
from retool_jax.tools.registry import ToolRegistry

BUILTIN_TOOLS = (
  "code_interpreter",
  "execute_bash",
  "run_tests",
  "analyze_code",
  "debug_code",
  "search_docs",
  "calculator",
)


def default_registry(sandbox: Any | Callable[[], Any] | None = None) -> ToolRegistry:
  """A registry with every built-in tool. ``sandbox`` is a sandbox, a function returning one, or
  ``None`` for the process-wide default (started on the first code call)."""
  if sandbox is None:
    get_sandbox = default_sandbox
  elif callable(sandbox) and not hasattr(sandbox, "run_async"):
    get_sandbox = sandbox
  else:

    def get_sandbox():
      return sandbox

  code_interpreter, execute_bash, run_tests, debug_code = sandbox_tools(get_sandbox)
  return ToolRegistry(
    [code_interpreter, execute_bash, run_tests, analyze_code, debug_code, search_docs, calculator]
  )


__all__ = [
  "BUILTIN_TOOLS",
  "Tool",
  "ToolRegistry",
  "ToolResult",
  "default_registry",
  "run_python",
  "tool",
]
