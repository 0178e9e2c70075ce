"""SFT-side loaders: ReTool-SFT, generic chat SFT, DPO pairs and ToolBench records, through `datasets`."""

import json
import os
from pathlib import Path

import pytest

from retool_jax.chat import load_tokenizer, parse_tool_calls, render_text
from retool_jax.data import (
  ChatExample,
  convert_retool_record,
  dumps_example,
  load_chat_sft,
  load_preference_pairs,
  load_retool_sft,
  load_toolbench,
  split_retool_turn,
)
from retool_jax.tools import default_registry

FIXTURES = Path(
  os.environ.get("RETOOL_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures")
)
CODE_SCHEMA = {
  "type": "function",
  "function": {
    "name": "code_interpreter",
    "description": "Run Python code.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
  },
}
# Built in the ReTool-SFT schema: one assistant string interleaving reasoning, code, interpreter output, answer.
RETOOL_ANSWER = (
  "We need the number of primes below 30.\n\n<code>\n```python\nfrom sympy import primepi\nprint(primepi(29))\n"
  "```\n</code>\n<interpreter>\n10\n</interpreter>\n\nSo there are 10. Double-check the sum too:\n"
  "<code>\n```python\nprint(sum([2, 3, 5, 7, 11, 13, 17, 19, 23, 29]))\n```\n</code>\n"
  "<interpreter>\n129\n</interpreter>\n\nBoth agree.\n<answer>\n\\boxed{10}\n</answer>"
)
RETOOL_RECORD = {
  "messages": [
    {"role": "user", "content": "How many primes are below 30?"},
    {"role": "assistant", "content": RETOOL_ANSWER},
  ]
}


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(FIXTURES / "qwen3_tokenizer")


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def trained_text(tok, ids, mask):
  return tok.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if m])


def test_retool_sft_inline(tok, tmp_path):
  path = write_jsonl(tmp_path / "retool.jsonl", [RETOOL_RECORD, RETOOL_RECORD])
  examples = load_retool_sft(path)
  assert len(examples) == 2 and examples[0].metadata["code_blocks"] == 2
  ids, mask = examples[0].encode(tok, enable_thinking=False)
  trained = trained_text(tok, ids, mask)
  assert "<interpreter>" not in trained and "129" not in trained
  assert trained.count("```python") == 2 and trained.endswith("\\boxed{10}\n</answer><|im_end|>")
  untrained = tok.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if not m])
  assert "\n<interpreter>\n10\n</interpreter>\n\n" in untrained


def test_retool_sft_as_tool_calls(tok):
  example = convert_retool_record(RETOOL_RECORD, "tool_calls", tools=[CODE_SCHEMA])
  roles = [m["role"] for m in example.messages]
  assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
  first_call = example.messages[1]["tool_calls"][0]["function"]
  assert first_call == {
    "name": "code_interpreter",
    "arguments": {"code": "from sympy import primepi\nprint(primepi(29))"},
  }
  assert example.messages[2]["content"] == "10" and example.messages[4]["content"] == "129"
  assert example.messages[-1]["content"] == "Both agree.\n<answer>\n\\boxed{10}\n</answer>"
  ids, mask = example.encode(tok)
  trained = trained_text(tok, ids, mask)
  assert "<tool_response>" not in trained and "129" not in trained.replace("print(sum", "")
  # What the model is trained to write parses back into the same calls.
  calls = parse_tool_calls(trained).calls
  assert [c.arguments["code"] for c in calls] == [
    "from sympy import primepi\nprint(primepi(29))",
    "print(sum([2, 3, 5, 7, 11, 13, 17, 19, 23, 29]))",
  ]
  assert "<tools>" in render_text(tok, example.messages, tools=example.tools)


def test_retool_sft_tool_calls_use_the_registry_schema(tmp_path):
  (example,) = load_retool_sft(write_jsonl(tmp_path / "retool.jsonl", [RETOOL_RECORD]), style="tool_calls")
  code_schema = [s for s in default_registry().schemas() if s["function"]["name"] == "code_interpreter"]
  assert example.tools == code_schema
  for message in example.messages:
    for call in message.get("tool_calls", []):
      assert default_registry().get("code_interpreter").validate(call["function"]["arguments"]) is None


def test_split_keeps_unexecuted_code_as_text():
  text = "Think.\n<code>\n```python\nprint(1)\n```\n</code>\nNo output here. <answer>1</answer>"
  assert split_retool_turn(text) == [{"role": "assistant", "content": text}]
  with pytest.raises(ValueError, match="record: messages must be user/system turns ending in one assistant"):
    convert_retool_record({"messages": [{"role": "user", "content": "x"}]})


def test_chat_sft_with_heterogeneous_tools(tok, tmp_path):
  search = {
    "type": "function",
    "function": {
      "name": "search",
      "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
  }
  rows = [
    {
      "messages": [
        {"role": "user", "content": "2**10?"},
        {
          "role": "assistant",
          "content": "",
          "tool_calls": [
            {
              "type": "function",
              "function": {"name": "code_interpreter", "arguments": "{\"code\": \"print(2**10)\"}"},
            }
          ],
        },
        {"role": "tool", "content": "1024"},
        {"role": "assistant", "content": "1024"},
      ],
      "tools": [CODE_SCHEMA],
    },
    {
      "messages": [
        {"role": "user", "content": "news?"},
        {
          "role": "assistant",
          "content": "",
          "tool_calls": [
            {"type": "function", "function": {"name": "search", "arguments": "{\"query\": \"news\"}"}}
          ],
        },
        {"role": "tool", "content": "none"},
        {"role": "assistant", "content": "Nothing new."},
      ],
      "tools": json.dumps([search]),
    },
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
  ]
  examples = load_chat_sft(write_jsonl(tmp_path / "chat.jsonl", rows))
  # Arrow merges dict columns into one struct; the loader removes the keys it invents.
  assert examples[0].tools == [CODE_SCHEMA] and examples[1].tools == [search] and examples[2].tools is None
  assert examples[0].messages[1]["tool_calls"][0]["function"]["arguments"] == {"code": "print(2**10)"}
  assert examples[2].messages == rows[2]["messages"]
  ids, mask = examples[0].encode(tok)
  assert '"arguments": {"code": "print(2**10)"}' in trained_text(tok, ids, mask)
  # Round trip through the writer.
  out = tmp_path / "again.jsonl"
  out.write_text("".join(dumps_example(e) + "\n" for e in examples))
  assert [e.messages for e in load_chat_sft(out)] == [e.messages for e in examples]


def test_chat_sft_errors(tmp_path):
  bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
  with pytest.raises(ValueError, match="bad.jsonl: row 0: no assistant turn"):
    load_chat_sft(bad)
  bad = write_jsonl(tmp_path / "bad2.jsonl", [{"messages": [{"role": "bot", "content": "hi"}]}])
  with pytest.raises(ValueError, match=r"bad2.jsonl: row 0: messages\[0\].role is 'bot'"):
    load_chat_sft(bad)
  bad = write_jsonl(
    tmp_path / "bad3.jsonl", [{"messages": [{"role": "assistant", "content": "x"}], "tools": "[{"}]
  )
  with pytest.raises(ValueError, match="bad3.jsonl: row 0: tools: not valid JSON"):
    load_chat_sft(bad)


def test_preference_pairs(tok, tmp_path):
  strings = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
  messages = [
    {
      "prompt": [{"role": "user", "content": "Hi"}],
      "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
    },
  ]
  pairs = load_preference_pairs(write_jsonl(tmp_path / "dpo.jsonl", strings))
  pairs += load_preference_pairs(write_jsonl(tmp_path / "dpo_messages.jsonl", messages))
  assert pairs[0].prompt == [{"role": "user", "content": "2+2?"}]
  assert pairs[1].chosen == [{"role": "assistant", "content": "Hello!"}]
  (c_ids, c_mask), (r_ids, r_mask) = pairs[0].encode(tok, enable_thinking=False)
  assert trained_text(tok, c_ids, c_mask) == "4<|im_end|>" and trained_text(tok, r_ids, r_mask) == "5<|im_end|>"
  n = len(c_ids) - 3  # "4", <|im_end|>, "\n"
  assert c_ids[:n].tolist() == r_ids[:n].tolist() and not c_mask[:n].any()
  same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "b"}])
  with pytest.raises(ValueError, match="same.jsonl: row 0: chosen and rejected are identical"):
    load_preference_pairs(same)


TOOLBENCH_ROW = {
  "query_id": 7,
  "api_list": [
    {
      "category_name": "Data",
      "tool_name": "Weather API",
      "api_name": "Current Weather",
      "api_description": "Weather now in a city.",
      "method": "GET",
      "required_parameters": [{"name": "city", "type": "STRING", "description": "City name", "default": "Paris"}],
      "optional_parameters": [{"name": "units", "type": "ENUM", "description": "", "default": "metric"}],
    },
  ],
  "conversations": [
    {"from": "system", "value": "You are AutoGPT, you can use many tools..."},
    {"from": "user", "value": "What is the weather in Oslo?\nBegin!\n"},
    {
      "from": "assistant",
      "value": "\nThought: I should call the weather API.\nAction: current_weather_for_weather_api"
      "\nAction Input: {\n\"city\": \"Oslo\"\n}",
    },
    {"from": "function", "value": "{\"error\": \"\", \"response\": \"{'temp': -3}\"}"},
    {
      "from": "assistant",
      "value": "\nThought: Done.\nAction: Finish\nAction Input: {\n\"return_type\": "
      "\"give_answer\",\n\"final_answer\": \"It is -3 degrees in Oslo.\"\n}",
    },
  ],
}


def test_toolbench(tok, tmp_path):
  (example,) = load_toolbench(write_jsonl(tmp_path / "tb.jsonl", [TOOLBENCH_ROW]))
  assert isinstance(example, ChatExample) and example.metadata == {
    "source": "toolbench",
    "finished": True,
    "id": 7,
  }
  (schema,) = example.tools
  assert schema["function"]["name"] == "current_weather_for_weather_api"
  assert schema["function"]["parameters"] == {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "City name"}, "units": {"type": "string"}},
    "required": ["city"],
  }
  assert [m["role"] for m in example.messages] == ["user", "assistant", "tool", "assistant"]
  assert example.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
  assert example.messages[-1]["content"] == "It is -3 degrees in Oslo."
  ids, mask = example.encode(tok)
  trained = trained_text(tok, ids, mask)
  assert "'temp': -3" not in trained
  assert [c.name for c in parse_tool_calls(trained).calls] == ["current_weather_for_weather_api"]
  broken = json.loads(json.dumps(TOOLBENCH_ROW))
  broken["conversations"][2]["value"] = "Thought: x\nAction: f\nAction Input: {oops"
  with pytest.raises(ValueError, match=r"tb2.jsonl: row 0: conversations\[2\]: Action Input of 'f' is not JSON"):
    load_toolbench(write_jsonl(tmp_path / "tb2.jsonl", [broken]))
