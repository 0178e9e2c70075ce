"""Tools that run code in the sandbox: code_interpreter, execute_bash, run_tests, debug_code."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from retool_jax.sandbox import Session
from retool_jax.tools.analysis import diagnose
from retool_jax.tools.base import Tool, ToolResult, tool

NO_OUTPUT = "(no output)"
# Time granted to run_tests on top of the call limits for starting the test runner (pytest's import).
RUNNER_STARTUP_S = 5.0

_PYTEST_DRIVER = """\
import pytest
open("test_submission.py", "w").write({code!r})
status = pytest.main(["-q", "-p", "no:cacheprovider", "--no-header", "-o", "console_output_style=classic",
                      "test_submission.py"])
raise SystemExit(int(status))
"""

_UNITTEST_DRIVER = """\
import sys, types, unittest
module = types.ModuleType("submission")
exec(compile({code!r}, "<cell>", "exec"), module.__dict__)
suite = unittest.defaultTestLoader.loadTestsFromModule(module)
result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(suite)
raise SystemExit(0 if result.wasSuccessful() and result.testsRun else 1)
"""


def _fresh(sandbox: Any) -> Any:
  """What runs a call in a fresh interpreter: a session's sandbox, else the sandbox itself."""
  return sandbox.sandbox if isinstance(sandbox, Session) else sandbox


def _result(res: Any) -> ToolResult:
  output = res.output if res.output.strip() else NO_OUTPUT
  return ToolResult(output, res.status == "ok", res.status, res.elapsed_s)


def sandbox_tools(get_sandbox: Callable[[], Any]) -> list[Tool]:
  """The code tools bound to a sandbox (called lazily, so the sandbox starts on first use)."""

  @tool
  async def code_interpreter(code: str) -> ToolResult:
    """Execute Python code in a sandboxed interpreter and return its output. numpy, sympy and scipy are
    available. The value of a final expression is shown if nothing was printed.

    Args:
        code: Python code to execute
    """
    return _result(await get_sandbox().run_async(code))

  @tool
  async def execute_bash(command: str) -> ToolResult:
    """Run a bash command in the sandbox (private scratch directory, resource limits) and return its output.

    Args:
        command: the bash command line to run
    """
    return _result(await get_sandbox().run_command_async(command))

  @tool
  async def run_tests(code: str, test_framework: Literal["pytest", "unittest"] = "pytest") -> ToolResult:
    """Run the tests contained in Python code (test functions for pytest, TestCase classes for unittest)
    and report which pass and fail.

    Args:
        code: Python source holding the code under test and its tests
        test_framework: the test runner to use
    """
    sandbox = get_sandbox()
    policy = sandbox.policy  # a session's own policy, also when the run goes to its sandbox
    runner = _fresh(sandbox)
    if policy is not None:
      policy = policy.with_modules("pytest", "unittest", "types", "sys")
      violation = policy.check(code)
      if violation is not None:
        return ToolResult(policy.message(violation), False, "policy")
    driver = _PYTEST_DRIVER if test_framework == "pytest" else _UNITTEST_DRIVER
    lim = sandbox.limits
    res = await runner.run_async(
      driver.format(code=code),
      limits=lim,
      policy=policy,
      max_output_bytes=max(lim.max_output_bytes, 16384),
      timeout_s=lim.timeout_s + RUNNER_STARTUP_S,
      cpu_s=(lim.cpu_s or lim.timeout_s) + RUNNER_STARTUP_S,
    )
    output = res.output.replace("SystemExit: 1\n", "")
    if res.status == "error" and re.search(r"SystemExit: [2-5]\b", output):
      output += "\n(the test run itself failed: no tests were collected or the file does not import)\n"
    return ToolResult(output.strip() + "\n", res.status == "ok", res.status, res.elapsed_s)

  @tool
  async def debug_code(code: str, error: str = "") -> ToolResult:
    """Rerun Python code that failed, locate the failing line and name the likely cause of the error.

    Args:
        code: the Python code that failed
        error: the error message or traceback that was seen
    """
    res = await get_sandbox().run_async(code)
    return ToolResult(diagnose(code, error, res.status, res.output), True, "ok", res.elapsed_s)

  return [code_interpreter, execute_bash, run_tests, debug_code]
