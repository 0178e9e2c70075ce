"""Rendering and incremental trajectory assembly on the real Qwen3 tokenizer."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retool_jax.chat import Trajectory, load_tokenizer, render_ids, render_text, tool_observation

FIXTURES = Path(
  os.environ.get("RETOOL_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures")
)
TOOLS = [
  {
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
]
CALL = '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(2**10)"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(FIXTURES / "qwen3_tokenizer")


def call_msg(code):
  return {"type": "function", "function": {"name": "code_interpreter", "arguments": {"code": code}}}


def generated(tok, text, eos=True):
  """What an engine returns for `text`: its ids, ending with <|im_end|> when it stopped at EOS."""
  return tok.encode(text, add_special_tokens=False) + ([tok.convert_tokens_to_ids("<|im_end|>")] if eos else [])


def test_tokenizer_is_cached(tok):
  assert load_tokenizer(str(FIXTURES / "qwen3_tokenizer")) is tok


def test_prompt_ids_match_the_published_rendering(tok):
  example = (FIXTURES / "qwen3_tokenizer" / "RENDERED_EXAMPLE.txt").read_text()
  expected = json.loads(re.search(r"^ids (\[.*\])$", example, re.M).group(1))
  ids = render_ids(tok, [{"role": "user", "content": "What is 2**10?"}], tools=TOOLS)
  assert ids == expected


def test_enable_thinking_is_passed_through(tok):
  msgs = [{"role": "user", "content": "hi"}]
  assert render_text(tok, msgs, enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert render_text(tok, msgs).endswith("<|im_start|>assistant\n")


def test_registry_like_tools_are_rendered(tok):
  class Registry:
    def schemas(self):
      return TOOLS

  msgs = [{"role": "user", "content": "hi"}]
  assert render_ids(tok, msgs, tools=Registry()) == render_ids(tok, msgs, tools=TOOLS)


def test_already_rendered_text_is_rejected(tok):
  text = render_text(tok, [{"role": "user", "content": "hi"}])
  with pytest.raises(ValueError, match=r"messages\[0\].content .*already rendered"):
    render_ids(tok, [{"role": "user", "content": text}])
  with pytest.raises(ValueError, match=r"messages\[1\].role"):
    render_ids(tok, [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])


TOOL_CONVERSATION = [
  {"role": "user", "content": "What is 2**10 and 3**5?"},
  {
    "role": "assistant",
    "content": "<think>\nI should compute it.\n</think>\n\n",
    "tool_calls": [call_msg("print(2**10)")],
  },
  {"role": "tool", "content": "1024"},
  {
    "role": "assistant",
    "content": "<think>\nNow both at once.\n</think>\n\nTwo calls.",
    "tool_calls": [call_msg("print(3**5)"), call_msg("print(3**5 + 1)")],
  },
  {"role": "tool", "content": "243"},
  {"role": "tool", "content": "244"},
  {
    "role": "assistant",
    "content": "<think>\nThe results are in.\n</think>\n\nThe answers are \\boxed{1024} and 243.",
  },
]
TURN_TEXTS = [
  "<think>\nI should compute it.\n</think>\n\n" + CALL,
  "<think>\nNow both at once.\n</think>\n\nTwo calls.\n"
  + CALL.replace("2**10", "3**5")
  + "\n"
  + CALL.replace("2**10", "3**5 + 1"),
  "<think>\nThe results are in.\n</think>\n\nThe answers are \\boxed{1024} and 243.",
]


@pytest.mark.parametrize("stop_at_eos", [True, False])
def test_incremental_assembly_equals_the_template(tok, stop_at_eos):
  traj = Trajectory(tok, render_ids(tok, TOOL_CONVERSATION[:1], tools=TOOLS))
  traj.add_generated(generated(tok, TURN_TEXTS[0], eos=stop_at_eos))
  traj.add_tool_results(["1024"])
  traj.add_generated(generated(tok, TURN_TEXTS[1], eos=stop_at_eos))
  traj.add_tool_results(["243", "244"])
  traj.add_generated(generated(tok, TURN_TEXTS[2]))

  full = render_ids(tok, TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=False)
  # The template ends every turn with "<|im_end|>\n"; generation stops at <|im_end|>.
  assert full[-1] == tok.encode("\n")[0]
  ids, mask = traj.export()
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape
  assert ids.tolist() == full[:-1]

  im_end = tok.convert_tokens_to_ids("<|im_end|>")
  trained = [i for i, m in zip(ids.tolist(), mask.tolist()) if m]
  expected_trained = sum((generated(tok, t, eos=stop_at_eos) for t in TURN_TEXTS[:2]), []) + generated(
    tok, TURN_TEXTS[2]
  )
  assert trained == expected_trained
  # Tool outputs and the rendered tool turns are never trained.
  assert "1024\n</tool_response>" in tok.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if not m])
  if not stop_at_eos:  # the <|im_end|> closing a tool-call turn was added by the environment
    assert sum(1 for i, m in zip(ids.tolist(), mask.tolist()) if i == im_end and m) == 1


def test_generated_ids_are_kept_verbatim(tok):
  canonical = tok.encode("hello", add_special_tokens=False)
  odd = [tok.convert_tokens_to_ids(c) for c in "hello"]  # same text, non-canonical split
  assert odd != canonical and tok.decode(odd) == "hello"
  traj = Trajectory(tok, render_ids(tok, [{"role": "user", "content": "n?"}]))
  traj.add_generated(odd, logprobs=[-0.5] * 5)
  assert traj.response_ids == odd and traj.response_mask == [1] * 5
  assert traj.logprobs[-5:] == [-0.5] * 5 and traj.logprobs[0] == 0.0
  with pytest.raises(ValueError, match="5 generated ids but 2 logprobs"):
    traj.add_generated(odd, logprobs=[0.0, 0.0])


def test_earlier_turns_lose_their_thinking_in_the_template(tok):
  """The one known difference: Qwen3's template drops <think> content of turns before the last user query."""
  msgs = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"},
    {"role": "user", "content": "2**10?"},
    {"role": "assistant", "content": "<think>\nCompute.\n</think>\n\n", "tool_calls": [call_msg("print(2**10)")]},
    {"role": "tool", "content": "1024"},
    {"role": "assistant", "content": "<think>\nDone.\n</think>\n\n1024"},
  ]
  traj = Trajectory(tok, render_ids(tok, msgs[:1], tools=TOOLS))
  traj.add_generated(generated(tok, msgs[1]["content"]))
  traj.add_user("2**10?")
  traj.add_generated(generated(tok, "<think>\nCompute.\n</think>\n\n" + CALL))
  traj.add_tool_results("1024")
  traj.add_generated(generated(tok, msgs[5]["content"]))

  full = render_text(tok, msgs, tools=TOOLS, add_generation_prompt=False)
  incremental = traj.text()
  assert incremental != full[:-1]
  assert incremental.replace("<think>\nGreet back.\n</think>\n\n", "", 1) == full[:-1]
  # Later turns (after the last user query) keep their thinking, so everything after it is token-identical.
  tail = render_ids(tok, msgs, tools=TOOLS, add_generation_prompt=False)[:-1]
  query = tok.encode("2**10?", add_special_tokens=False)
  cut = next(i for i in range(len(tail)) if tail[i : i + len(query)] == query)
  assert traj.ids[-(len(tail) - cut) :] == tail[cut:]


def test_non_thinking_mode(tok):
  """Thinking off: each assistant turn opens with an empty think block, which the template drops from
  turns that are not the last one (the same rule as above, for empty reasoning)."""
  msgs = [
    TOOL_CONVERSATION[0],
    {"role": "assistant", "content": "", "tool_calls": [call_msg("print(2**10)")]},
    {"role": "tool", "content": "1024"},
  ]
  traj = Trajectory(tok, render_ids(tok, msgs[:1], tools=TOOLS, enable_thinking=False), enable_thinking=False)
  traj.add_generated(generated(tok, CALL))
  traj.add_tool_results("1024")
  rerendered = render_text(tok, msgs, tools=TOOLS, enable_thinking=False)
  assert rerendered.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert traj.text().replace("<think>\n\n</think>\n\n", "", 1) == rerendered


def test_retool_inline_observation(tok):
  prompt = render_ids(tok, [{"role": "user", "content": "2**10?"}])
  traj = Trajectory(tok, prompt, observation_format="retool")
  turn = "Let me compute.\n<code>\n```python\nprint(2**10)\n```\n</code>"
  gen = tok.encode(turn, add_special_tokens=False)
  traj.add_generated(gen)
  obs = traj.add_tool_results("1024")
  traj.add_generated(generated(tok, "<answer>\\boxed{1024}</answer>"))
  assert tok.decode(obs) == "\n\n<interpreter>\n1024\n</interpreter>\n\n"
  ids, mask = traj.export()
  assert ids[len(prompt) : len(prompt) + len(gen)].tolist() == gen
  assert mask[len(prompt) + len(gen) : len(prompt) + len(gen) + len(obs)].tolist() == [0] * len(obs)
  assert traj.num_observations == 1 and traj.num_policy_turns == 2
  assert tool_observation(["a", "b"], "retool").count("<interpreter>") == 2
  with pytest.raises(ValueError, match="unknown observation format"):
    tool_observation("x", "xml")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=40).filter(lambda s: "<|im_" not in s), min_size=1, max_size=3))
def test_any_tool_output_assembles_like_the_template(tok, outputs):
  calls = [call_msg(f"print({k})") for k in range(len(outputs))]
  msgs = [
    {"role": "user", "content": "Run them."},
    {"role": "assistant", "content": "<think>\nRun.\n</think>\n\n", "tool_calls": calls},
    *({"role": "tool", "content": o} for o in outputs),
    {"role": "assistant", "content": "<think>\nOk.\n</think>\n\nDone."},
  ]
  turn = "<think>\nRun.\n</think>\n\n" + "\n".join(CALL.replace("2**10", str(k)) for k in range(len(outputs)))
  traj = Trajectory(tok, render_ids(tok, msgs[:1], tools=TOOLS))
  traj.add_generated(generated(tok, turn))
  traj.add_tool_results(outputs)
  traj.add_generated(generated(tok, "<think>\nOk.\n</think>\n\nDone."))
  assert traj.ids == render_ids(tok, msgs, tools=TOOLS, add_generation_prompt=False)[:-1]
