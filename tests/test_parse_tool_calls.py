"""Tool-call parsing: the qwen25 format, ReTool <code> blocks, Markdown blocks, and errors the model can read."""

import asyncio
import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retool_jax.chat import call_outputs, parse_tool_calls
from retool_jax.tools import default_registry


def block(obj):
  return f"<tool_call>\n{json.dumps(obj)}\n</tool_call>"


class FakeTool:
  def __init__(self, required):
    self.required = required

  def validate(self, arguments):
    missing = [k for k in self.required if k not in arguments]
    return f"missing required argument(s): {', '.join(missing)}" if missing else None


class FakeRegistry:
  """The registry interface parse_tool_calls relies on: get(name) and names()."""

  tools = {"code_interpreter": FakeTool(["code"]), "search": FakeTool(["query"])}

  def get(self, name):
    return self.tools.get(name)

  def names(self):
    return sorted(self.tools)


def test_several_calls_and_normal_content():
  text = (
    "Let me check.\n"
    + block({"name": "search", "arguments": {"query": "a"}})
    + "\n"
    + block({"name": "code_interpreter", "parameters": {"code": "print(1)"}})
  )
  result = parse_tool_calls(text)
  assert result.content == "Let me check."
  assert [(c.name, c.arguments) for c in result.calls] == [
    ("search", {"query": "a"}),
    ("code_interpreter", {"code": "print(1)"}),
  ]
  assert result.errors == [] and result.calls[0].span[0] == text.index("<tool_call>")


def test_compact_block_list_payload_and_string_arguments():
  text = '<tool_call>[{"name": "a", "arguments": "{\\"x\\": 1}"}, {"name": "b"}]</tool_call>'
  result = parse_tool_calls(text)
  assert [(c.name, c.arguments) for c in result.calls] == [("a", {"x": 1}), ("b", {})]


def test_text_without_calls():
  result = parse_tool_calls("The answer is \\boxed{4}.")
  assert result.calls == [] and result.errors == [] and not result.found
  assert result.content == "The answer is \\boxed{4}."


def test_malformed_json_becomes_a_readable_error():
  text = '<tool_call>\n{"name": "search", "arguments": {"query": "a"}\n</tool_call>' + block({"name": "x"})
  result = parse_tool_calls(text)
  assert len(result.errors) == 1
  assert result.errors[0].startswith("Error: tool call 1 is not valid JSON")
  assert '"arguments": <args-json-object>' in result.errors[0]
  assert [c.name for c in result.calls] == ["x"]
  assert [type(i).__name__ for i in result.items] == ["CallError", "ToolCall"]


def test_incomplete_last_block():
  result = parse_tool_calls(block({"name": "a"}) + '\n<tool_call>\n{"name": "b", "argu')
  assert [c.name for c in result.calls] == ["a"]
  assert result.errors == [
    "Error: incomplete tool call: the tool_call block was never closed with '</tool_call>'."
  ]


def test_shape_errors():
  cases = {
    "<tool_call>[]</tool_call>": "empty list",
    "<tool_call>42</tool_call>": "must be a JSON object",
    '<tool_call>{"arguments": {}}</tool_call>': 'no "name"',
    '<tool_call>{"name": "a", "arguments": [1]}</tool_call>': "must be a JSON object, got list",
    '<tool_call>{"name": "a", "arguments": "{nope"}</tool_call>': "string that is not JSON",
    "<tool_call>" + "[" * 100000 + "</tool_call>": "not valid JSON|nested too deeply",
  }
  for text, needle in cases.items():
    errors = parse_tool_calls(text).errors
    assert len(errors) == 1 and any(n in errors[0] for n in needle.split("|")), (text[:40], errors)


def test_registry_checks_unknown_tools_and_arguments():
  text = block({"name": "browse", "arguments": {}}) + block({"name": "search", "arguments": {"q": 1}})
  text += block({"name": "search", "arguments": {"query": "ok"}})
  result = parse_tool_calls(text, FakeRegistry())
  assert result.errors == [
    "Error: unknown tool 'browse'. Available tools: code_interpreter, search.",
    "Error: bad arguments for tool 'search': missing required argument(s): query",
  ]
  assert [c.arguments for c in result.calls] == [{"query": "ok"}]


def test_retool_code_blocks_have_their_fence_stripped():
  code = "import math\nprint(math.factorial(5))"
  text = f"Compute.\n<code>\n```python\n{code}\n```\n</code>\nthen <code>print(2)</code>"
  result = parse_tool_calls(text)
  assert [(c.name, c.arguments["code"], c.format) for c in result.calls] == [
    ("code_interpreter", code, "code"),
    ("code_interpreter", "print(2)", "code"),
  ]
  compile(result.calls[0].arguments["code"], "<code>", "exec")  # the fence is gone: valid Python
  assert result.content == "Compute."
  assert parse_tool_calls("<code>\n```bash\nls\n```\n</code>").errors == [
    "Error: code blocks must be Python; got a ```bash block."
  ]
  assert parse_tool_calls("<code>\n```python\n```\n</code>").errors == ["Error: code block 1 is empty."]
  assert parse_tool_calls("<code>```python\nprint(1)").errors[0].startswith("Error: incomplete tool call")
  assert parse_tool_calls(text, code_tool="python").calls[0].name == "python"


def test_bare_python_blocks_are_optional():
  text = "Try:\n```python\nprint(3)\n```\nand ```py\nprint(4)\n```"
  assert parse_tool_calls(text).calls == []
  result = parse_tool_calls(text, bare_python=True)
  assert [c.arguments["code"] for c in result.calls] == ["print(3)", "print(4)"]
  assert all(c.format == "markdown" for c in result.calls)
  # A fence inside a <code> block belongs to that block and is not read twice.
  assert len(parse_tool_calls("<code>\n```python\nprint(1)\n```\n</code>", bare_python=True).calls) == 1


def test_formats_can_be_restricted():
  text = block({"name": "a"}) + "<code>print(1)</code>"
  assert [c.format for c in parse_tool_calls(text, formats=("code",)).calls] == ["code"]
  assert parse_tool_calls(text, formats=("yaml",)).errors[0].startswith("unknown call formats")
  assert parse_tool_calls(None).errors == ["expected generated text, got NoneType"]


FRAGMENTS = st.sampled_from(
  [
    "<tool_call>",
    "</tool_call>",
    "<code>",
    "</code>",
    "```python\n",
    "```",
    "\n",
    "{",
    "}",
    "[",
    "]",
    '"name"',
    '"arguments"',
    '"parameters"',
    ":",
    ",",
    '"code_interpreter"',
    '"search"',
    "null",
    "1",
    '"\\u00e9"',
    "<think>",
    "</think>",
    "<interpreter>",
    " ",
    "\\",
    '"',
  ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(FRAGMENTS, st.text(max_size=8)), max_size=40), st.booleans())
def test_parsing_never_raises(pieces, bare):
  text = "".join(pieces)
  for registry in (None, FakeRegistry()):
    result = parse_tool_calls(text, registry, bare_python=bare)
    assert all(isinstance(e, str) and e for e in result.errors)
    for call in result.calls:
      assert isinstance(call.name, str) and isinstance(call.arguments, dict)
      assert 0 <= call.span[0] < call.span[1] <= len(text)


JSON_VALUES = st.recursive(
  st.none() | st.booleans() | st.integers() | st.text(max_size=10),
  lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
  max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
  st.lists(
    st.tuples(
      st.text(min_size=1, max_size=12).filter(str.strip), st.dictionaries(st.text(max_size=6), JSON_VALUES)
    ),
    min_size=1,
    max_size=4,
  ),
  st.text(max_size=30).filter(lambda s: "<tool_call>" not in s and "<code>" not in s),
)
def test_rendered_calls_round_trip(calls, prefix):
  text = prefix + "\n".join(block({"name": n, "arguments": a}) for n, a in calls)
  result = parse_tool_calls(text, formats=("tool_call",))
  assert result.errors == []
  assert [(c.name, c.arguments) for c in result.calls] == calls


def test_call_outputs_keep_text_order():
  class AsyncRegistry(FakeRegistry):
    async def call(self, name, arguments):
      await asyncio.sleep(0.01 if name == "search" else 0)
      return SimpleNamespace(output=f"{name}:{json.dumps(arguments, sort_keys=True)}", ok=True)

  text = block({"name": "search", "arguments": {"query": "a"}}) + "<tool_call>{bad</tool_call>"
  text += block({"name": "code_interpreter", "arguments": {"code": "1"}})
  outputs = asyncio.run(call_outputs(parse_tool_calls(text, AsyncRegistry()), AsyncRegistry()))
  assert outputs[0] == 'search:{"query": "a"}' and outputs[2] == 'code_interpreter:{"code": "1"}'
  assert outputs[1].startswith("Error: tool call 2 is not valid JSON")


def test_with_the_real_registry():
  registry = default_registry()
  text = block({"name": "code_interpreter", "arguments": {"code": "print(1)"}})
  text += block({"name": "calculator", "arguments": {"expr": "1+1"}}) + block({"name": "browser", "arguments": {}})
  result = parse_tool_calls(text, registry)
  assert [c.name for c in result.calls] == ["code_interpreter"]
  assert len(result.errors) == 2
  assert result.errors[0].startswith("Error: bad arguments for tool 'calculator': ")
  assert result.errors[1].startswith("Error: unknown tool 'browser'. Available tools: ")
  assert "code_interpreter" in result.errors[1]


def test_reads_blocks_as_sglang_qwen25_does():
  """Behaviour shared with SGLang's qwen25 detector: stripped normal text, stripped bodies, list payloads,
  `parameters` before `arguments`; and where this parser deliberately differs (errors instead of skips)."""
  text = (
    "  Two lookups.  \n<tool_call>\n\n  "
    + json.dumps({"name": "search", "parameters": {"query": "p"}, "arguments": {"query": "a"}})
    + "  \n\n</tool_call>\n\n<tool_call>\n"
    + json.dumps([{"name": "search", "arguments": {"query": "b"}}, {"name": "code_interpreter"}])
    + "\n</tool_call>"
  )
  result = parse_tool_calls(text)
  assert result.content == "Two lookups."
  assert [(c.name, c.arguments) for c in result.calls] == [
    ("search", {"query": "p"}),
    ("search", {"query": "b"}),
    ("code_interpreter", {}),
  ]
  # An empty `parameters` falls back to `arguments`; falsy non-object arguments are still an error.
  assert parse_tool_calls(block({"name": "a", "parameters": {}, "arguments": {"x": 1}})).calls[0].arguments == {
    "x": 1
  }
  assert "must be a JSON object, got list" in parse_tool_calls(block({"name": "a", "arguments": []})).errors[0]
  # SGLang drops a malformed block and an unknown tool without a word; here both are errors, in text order.
  result = parse_tool_calls("<tool_call>\n{oops}\n</tool_call>" + block({"name": "nope"}), FakeRegistry())
  assert result.calls == [] and len(result.errors) == 2 and "unknown tool 'nope'" in result.errors[1]


# ---- the tag named in prose ------------------------------------------------------------------------

CALL_AFTER_PROSE = (
  "<think>\nI will write a <tool_call> block ... </think>\n\n"
  '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(2 + 2)"}}\n</tool_call>'
)


def test_a_tag_named_in_a_thought_does_not_swallow_the_real_call():
  result = parse_tool_calls(CALL_AFTER_PROSE)
  assert result.errors == []
  assert [(c.name, c.arguments) for c in result.calls] == [("code_interpreter", {"code": "print(2 + 2)"})]
  assert result.content == "<think>\nI will write a <tool_call> block ... </think>"


@pytest.mark.parametrize(
  "text",
  ["Use <tool_call> tags to call tools.", "Tools are called in <tool_call> blocks; the answer is 4."],
)
def test_prose_that_names_the_tag_is_content_not_an_error(text):
  result = parse_tool_calls(text)
  assert not result.found and result.errors == []
  assert result.content == text


def test_calls_written_inline_or_cut_short_are_still_blocks():
  inline = parse_tool_calls('<tool_call>{"name": "a", "arguments": {}}</tool_call>')
  assert [c.name for c in inline.calls] == ["a"]
  assert parse_tool_calls("<tool_call>42</tool_call>").errors  # closed: a block with a bad body
  assert "incomplete" in parse_tool_calls('ok <tool_call>\n{"name": "a"').errors[0]
  assert "incomplete" in parse_tool_calls("ok <tool_call>").errors[0]


# ---- ReTool cells with several fenced blocks -------------------------------------------------------


def test_a_code_cell_with_two_fenced_blocks_runs_both_in_order_without_fences():
  text = "<code>\n```python\nx = 1\nprint(x)\n```\n```python\nprint(x + 1)\n```\n</code>"
  (call,) = parse_tool_calls(text).calls
  assert call.arguments["code"] == "x = 1\nprint(x)\nprint(x + 1)"
  compile(call.arguments["code"], "<cell>", "exec")
  bad = parse_tool_calls("<code>\n```python\nprint(1)\n```\n```bash\nls\n```\n</code>")
  assert bad.calls == [] and "must be Python" in bad.errors[0]
