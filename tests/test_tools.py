"""The tool registry, tool declaration and validation, and every built-in tool."""

from __future__ import annotations

import asyncio
import enum
import json
import os
import threading
from pathlib import Path
from typing import Literal, Optional

import pytest

from retool_jax.sandbox import Limits, Sandbox
from retool_jax.tools import BUILTIN_TOOLS, Tool, ToolRegistry, ToolResult, default_registry, tool
from retool_jax.tools.analysis import diagnose

FIXTURES = Path(
  os.environ.get("RETOOL_FIXTURES") or Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
)
QWEN3 = FIXTURES / "qwen3_tokenizer"
CODE_SPEC = {
  "type": "function",
  "function": {
    "name": "code_interpreter",
    "description": "Execute Python code and return stdout.",
    "parameters": {
      "type": "object",
      "properties": {"code": {"type": "string", "description": "Python code to execute"}},
      "required": ["code"],
    },
  },
}


@pytest.fixture(scope="module")
def sandbox():
  sb = Sandbox("auto", limits=Limits(timeout_s=3.0, memory_mb=512), max_workers=2, warm_workers=1)
  yield sb
  sb.close()


@pytest.fixture(scope="module")
def registry(sandbox):
  return default_registry(sandbox)


# -- rendering --------------------------------------------------------------------------


def test_system_block_matches_fixture_rendering():
  reg = ToolRegistry([Tool.from_json_schema(CODE_SPEC, lambda code: code)])
  rendered = (QWEN3 / "RENDERED_EXAMPLE.txt").read_text()
  example = rendered.split("=== EXAMPLE 1: tools + add_generation_prompt ===\n", 1)[1]
  assert example.startswith("<|im_start|>system\n" + reg.render_system_block() + "<|im_end|>\n<|im_start|>user\n")


def test_system_block_matches_chat_template(registry):
  transformers = pytest.importorskip("transformers")
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(QWEN3))
  messages = [{"role": "user", "content": "What is 2**10?"}]
  text = tokenizer.apply_chat_template(messages, tools=registry.schemas(), tokenize=False)
  assert text.startswith("<|im_start|>system\n" + registry.render_system_block() + "<|im_end|>\n")
  with_system = [{"role": "system", "content": "Be brief."}, *messages]
  text = tokenizer.apply_chat_template(with_system, tools=registry.schemas(), tokenize=False)
  assert text.startswith("<|im_start|>system\nBe brief.\n\n" + registry.render_system_block() + "<|im_end|>")


def test_default_registry_has_every_builtin(registry):
  assert registry.names() == list(BUILTIN_TOOLS)
  for schema in registry.schemas():
    fn = schema["function"]
    assert schema["type"] == "function" and fn["description"] and fn["parameters"]["type"] == "object"
    assert set(fn["parameters"]["required"]) <= set(fn["parameters"]["properties"])
  assert registry.get("run_tests").parameters["properties"]["test_framework"]["enum"] == ["pytest", "unittest"]
  assert registry.get("nope") is None


# -- declaring tools ----------------------------------------------------------------------


class Unit(enum.Enum):
  C = "celsius"
  F = "fahrenheit"


def test_tool_decorator_derives_schema():
  @tool
  def convert(
    value: float,
    unit: Unit,
    places: int = 2,
    tags: Optional[list[str]] = None,
    mode: Literal["fast", "exact"] = "fast",
  ) -> str:
    """Convert a temperature.

    Longer notes that stay in the description.

    Args:
        value: the temperature
        unit: the unit to convert to,
            continued on a second line
        places: decimal places
        tags: labels
        mode: how to convert
    """
    return f"{value}{unit}"

  assert convert.name == "convert"
  assert convert.description == "Convert a temperature.\n\nLonger notes that stay in the description."
  assert convert.parameters == {
    "type": "object",
    "properties": {
      "value": {"type": "number", "description": "the temperature"},
      "unit": {
        "type": "string",
        "enum": ["celsius", "fahrenheit"],
        "description": "the unit to convert to, continued on a second line",
      },
      "places": {"type": "integer", "description": "decimal places"},
      "tags": {"type": "array", "items": {"type": "string"}, "description": "labels"},
      "mode": {"type": "string", "enum": ["fast", "exact"], "description": "how to convert"},
    },
    "required": ["value", "unit"],
  }

  @tool(name="renamed", description="custom")
  async def other(x: int) -> int:
    return x + 1

  assert (other.name, other.description) == ("renamed", "custom")
  assert asyncio.run(other.run({"x": 1})).output == "2"


def test_tool_decorator_rejects_undescribable_functions():
  with pytest.raises(TypeError, match="parameter 'x' needs a type hint"):
    tool(lambda x: x)

  def varargs(*a: int) -> None: ...

  with pytest.raises(TypeError, match=r"\*args"):
    tool(varargs)

  def weird(x: object) -> None: ...

  with pytest.raises(TypeError, match="parameter 'x'.*cannot derive"):
    tool(weird)


def test_from_json_schema_and_bad_specs():
  flat = Tool.from_json_schema(
    {
      "name": "echo",
      "description": "Echo.",
      "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
    lambda text: text,
  )
  assert flat.schema()["function"]["name"] == "echo"
  with pytest.raises(ValueError, match="missing field"):
    Tool.from_json_schema({"name": "x"}, print)
  with pytest.raises(ValueError, match="type.*object"):
    Tool("x", "", {"type": "string"}, print)
  with pytest.raises(ValueError, match="invalid parameters schema"):
    Tool("x", "", {"type": "object", "properties": {"a": {"type": "strng"}}}, print)
  with pytest.raises(ValueError, match="tool name"):
    Tool("bad name!", "", {"type": "object"}, print)
  reg = ToolRegistry([flat])
  with pytest.raises(ValueError, match="already registered"):
    reg.register(flat)
  with pytest.raises(KeyError, match="unknown tool"):
    reg.subset(["echo", "missing"])


@pytest.mark.parametrize(
  "arguments, message",
  [
    ({}, "missing required argument 'code'"),
    ({"code": 5}, "argument 'code' must be string, got integer"),
    (
      {"code": "1", "test_framework": "nose"},
      "argument 'test_framework' must be one of 'pytest', 'unittest', got 'nose'",
    ),
    ({"code": "1", "extra": True}, "unexpected argument 'extra' (expected: code, test_framework)"),
    (["code"], "arguments must be a JSON object, got array"),
    ({"code": "print(1)"}, None),
  ],
)
def test_validate_messages(registry, arguments, message):
  assert registry.get("run_tests").validate(arguments) == message


def test_call_never_raises(registry):
  def explode(n: int) -> str:
    """Fails."""
    raise RuntimeError(f"boom {n}")

  reg = ToolRegistry([tool(explode), registry.get("calculator")])
  cases = [
    ("missing", {}, "unknown_tool", "Error: unknown tool 'missing'. Available tools: explode, calculator"),
    ("explode", {"n": 3}, "error", "Error: explode failed: RuntimeError: boom 3"),
    ("explode", '{"n": ', "invalid_arguments", "Error: invalid arguments for explode: not valid JSON"),
    ("explode", {"n": "3"}, "invalid_arguments", "argument 'n' must be integer, got string"),
    ("calculator", '{"expression": "6*7"}', "ok", "42"),
    (None, {}, "unknown_tool", "Error: unknown tool None"),
  ]
  for name, args, status, text in cases:
    res = reg.call_sync(name, args)
    assert isinstance(res, ToolResult) and res.status == status and text in res.output, res
    assert res.ok == (status == "ok")


def test_plain_function_tools_do_not_block_each_other():
  started = threading.Event()

  @tool
  def waiter() -> str:
    """Waits for the other tool."""
    return "met" if started.wait(10) else "alone"

  @tool
  def signaller() -> str:
    """Signals the waiter."""
    started.set()
    return "sent"

  @tool
  def quits() -> str:
    """Exits."""
    raise SystemExit(2)

  reg = ToolRegistry([waiter, signaller, quits])

  async def both():
    return await asyncio.gather(reg.call("waiter", {}), reg.call("signaller", {}))

  assert [r.output for r in asyncio.run(both())] == ["met", "sent"]
  res = reg.call_sync("quits", {})
  assert (res.status, res.output) == ("error", "Error: quits failed: SystemExit: 2")


def test_call_sync_inside_a_running_loop(registry):
  async def inner():
    return registry.call_sync("calculator", {"expression": "1/3 + 1/6"})

  assert asyncio.run(inner()).output == "1/2 ≈ 0.5"


def test_concurrent_async_calls(registry):
  async def many():
    calls = [registry.call("code_interpreter", {"code": f"{i} * {i}"}) for i in range(6)]
    return await asyncio.gather(*calls)

  assert [r.output for r in asyncio.run(many())] == [f"{i * i}\n" for i in range(6)]


# -- built-in tools ----------------------------------------------------------------------


def test_code_interpreter(registry):
  res = registry.call_sync("code_interpreter", {"code": "import sympy as sp\nsp.isprime(2**61 - 1)"})
  assert (res.status, res.output, res.ok) == ("ok", "True\n", True)
  assert registry.call_sync("code_interpreter", {"code": "x = 1"}).output == "(no output)"
  err = registry.call_sync("code_interpreter", {"code": "[1][2]"})
  assert err.status == "error" and not err.ok and "IndexError: list index out of range" in err.output
  assert registry.call_sync("code_interpreter", {"code": "import os"}).status == "policy"


def test_execute_bash(registry):
  res = registry.call_sync("execute_bash", {"command": "echo $((6 * 7)); touch made; ls"})
  assert res.ok and res.output == "42\nmade\n"
  assert registry.call_sync("execute_bash", {"command": "ls made"}).status == "error"  # a fresh scratch each call


def test_run_tests_pytest_and_unittest(registry):
  code = "def add(a, b):\n    return a + b\n\ndef test_ok():\n    assert add(1, 2) == 3\n\ndef test_bad():\n    assert add(1, 1) == 3\n"
  res = registry.call_sync("run_tests", {"code": code})
  assert res.status == "error" and "1 failed, 1 passed" in res.output and "assert 2 == 3" in res.output
  good = registry.call_sync(
    "run_tests", {"code": code.replace("== 3\n", "== 2\n", 2).replace("(1, 2) == 2", "(1, 2) == 3")}
  )
  assert good.ok and "2 passed" in good.output
  unit = (
    "import unittest\n\nclass T(unittest.TestCase):\n    def test_a(self):\n        self.assertEqual(1 + 1, 2)\n"
    "    def test_b(self):\n        self.assertEqual(1 + 1, 3)\n"
  )
  res = registry.call_sync("run_tests", {"code": unit, "test_framework": "unittest"})
  assert res.status == "error" and "Ran 2 tests" in res.output and "FAILED (failures=1)" in res.output
  assert registry.call_sync("run_tests", {"code": "import os\ndef test_x(): pass"}).status == "policy"


def test_analyze_code(registry):
  bad = registry.call_sync("analyze_code", {"code": "x = 1\ndef f(:\n    pass"})
  assert bad.output.startswith("SyntaxError at line 2, column 7")
  assert registry.call_sync("analyze_code", {"code": "x = 1"}).output == "No syntax errors."
  risky = (
    "import subprocess as sp\nfrom os import system\nsp.run(['ls'])\nsystem('id')\neval('1')\nopen('f', 'w')\n"
  )
  sec = registry.call_sync("analyze_code", {"code": risky, "analysis_type": "security"}).output
  for expected in (
    "line 1: imports subprocess",
    "line 3: call to subprocess.run",
    "line 4: call to os.system",
    "line 5: call to eval",
    "line 6: open(...) for writing",
  ):
    assert expected in sec, sec
  assert (
    registry.call_sync("analyze_code", {"code": "print(1)", "analysis_type": "security"}).output
    == "No risky calls or imports found."
  )
  code = (
    "def f(x):\n    if x > 0 and x < 10:\n        return [i for i in range(x) if i % 2]\n"
    "    for i in range(3):\n        while x:\n            x -= 1\n    return 0\n\ndef g():\n    return 1\n"
  )
  out = registry.call_sync("analyze_code", {"code": code, "analysis_type": "complexity"}).output
  assert "f (line 1): 7 (moderate)" in out and "g (line 9): 1 (low)" in out


def test_debug_code(registry):
  code = "values = [3, 4]\ntotal = 0\nfor v in values:\n    totl += v\nprint(total)"
  out = registry.call_sync("debug_code", {"code": code, "error": "NameError"}).output
  assert "Failing line 4: totl += v" in out
  assert "NameError: name 'totl' is not defined" in out and "did you mean 'total'?" in out
  loop = registry.call_sync("debug_code", {"code": "n = 1\nwhile n > 0:\n    n += 1", "error": ""})
  assert loop.ok and "timed out" in loop.output and "while loop at line 2" in loop.output
  reported = registry.call_sync(
    "debug_code", {"code": "print(1)", "error": 'File "<cell>", line 1\nZeroDivisionError: x'}
  )
  assert "ran without an error this time" in reported.output and "ZeroDivisionError" in reported.output


def test_builtins_on_a_session(sandbox):
  """A trajectory's registry on a persistent session: state survives; commands and tests run in fresh calls."""
  with sandbox.session() as session:
    reg = default_registry(session)
    assert reg.call_sync("code_interpreter", {"code": "total = 40"}).output == "(no output)"
    assert reg.call_sync("code_interpreter", {"code": "total + 2"}).output == "42\n"
    assert reg.call_sync("execute_bash", {"command": "echo $((6 * 7))"}).output == "42\n"
    tests = reg.call_sync("run_tests", {"code": "def test_a():\n    assert 1 + 1 == 2\n"})
    assert tests.ok and "1 passed" in tests.output, tests.output
    unit = "import unittest\n\nclass T(unittest.TestCase):\n    def test_a(self):\n        self.assertTrue(True)\n"
    assert "OK" in reg.call_sync("run_tests", {"code": unit, "test_framework": "unittest"}).output
    debug = reg.call_sync("debug_code", {"code": "total / 0", "error": "ZeroDivisionError"}).output
    assert "Failing line 1: total / 0" in debug
    assert reg.call_sync("code_interpreter", {"code": "print(total)"}).output == "40\n"


def test_debug_code_timeout_names_the_loop():
  out = diagnose("n = 1\nwhile n > 0:\n    n += 1", "", "timeout", "TimeoutError: ...")
  assert "infinite loop" in out and "while loop at line 2" in out


def test_search_docs(registry):
  res = registry.call_sync("search_docs", {"query": "greatest common divisor"})
  assert res.ok and res.output.startswith("1. math.gcd(")
  assert registry.call_sync("search_docs", {"query": "itertools.combinations"}).output.startswith(
    "1. itertools.combinations(iterable, r)"
  )
  assert "fractions.Fraction" in registry.call_sync("search_docs", {"query": "rational numbers fraction"}).output
  assert registry.call_sync("search_docs", {"query": "  "}).status == "error"
  assert registry.call_sync("search_docs", {"query": "qwxzv"}).output == "No documentation matches 'qwxzv'."


@pytest.mark.parametrize(
  "expression, expected",
  [
    ("2**100", str(2**100)),
    ("1/3 + 1/6", "1/2 ≈ 0.5"),
    ("0.1 + 0.2", "3/10 ≈ 0.3"),
    ("sqrt(8) * sqrt(2)", "4"),
    ("2^10 - factorial(5)", "904"),
    ("gcd(84, 36) + binomial(10, 3)", "132"),
    ("7 // 2 + 7 % 2", "4"),
    ("-(3 - 5) ** 2", "-4"),
    ("pi", "pi ≈ 3.14159265358979"),
  ],
)
def test_calculator_exact(registry, expression, expected):
  res = registry.call_sync("calculator", {"expression": expression})
  assert (res.status, res.output) == ("ok", expected)


@pytest.mark.parametrize(
  "expression, message",
  [
    ("1/0", "division by zero"),
    ("10**10**10", "exponent 10000000000 is larger than 10000"),
    ("__import__('os')", "unknown function '__import__'"),
    ("x + 1", "unknown name 'x'"),
    ("(1).__class__", "unsupported syntax"),
    ("1 +", "cannot parse the expression"),
    ("factorial(10**6)", "factorial needs an integer"),
    ("(2**10000)**10000", "the result has more than 5000 digits"),
  ],
)
def test_calculator_refuses(registry, expression, message):
  res = registry.call_sync("calculator", {"expression": expression})
  assert res.status == "error" and not res.ok and message in res.output


def test_tool_result_from_tool_returning_objects():
  @tool
  def count(n: int) -> list:
    """Counts."""
    return list(range(n))

  assert asyncio.run(count.run({"n": 3})).output == "[0, 1, 2]"
  assert json.loads(json.dumps(count.schema()))["function"]["parameters"]["required"] == ["n"]
