"""SFT encoding: only assistant tokens (with their <|im_end|>) are trained; inline tool output never is."""

import os
from pathlib import Path

import pytest

from retool_jax.chat import Trajectory, encode_sft, load_tokenizer, render_ids, render_text

FIXTURES = Path(
  os.environ.get("RETOOL_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures")
)
CALL = {"type": "function", "function": {"name": "code_interpreter", "arguments": {"code": "print(2**10)"}}}
TOOLS = [{"type": "function", "function": {"name": "code_interpreter", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(FIXTURES / "qwen3_tokenizer")


def runs(tok, ids, mask, bit):
  """Decoded maximal runs of tokens whose mask equals `bit`."""
  out, cur = [], []
  for i, m in zip(ids.tolist(), mask.tolist()):
    if m == bit:
      cur.append(i)
    elif cur:
      out.append(tok.decode(cur))
      cur = []
  if cur:
    out.append(tok.decode(cur))
  return out


def test_tool_conversation(tok):
  msgs = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2**10?"},
    {"role": "assistant", "content": "<think>\nCompute.\n</think>\n\n", "tool_calls": [CALL]},
    {"role": "tool", "content": "1024"},
    {"role": "assistant", "content": "<think>\nDone.\n</think>\n\n\\boxed{1024}"},
  ]
  ids, mask = encode_sft(tok, msgs, tools=TOOLS)
  # Same ids as tokenising the whole rendered conversation.
  assert ids.tolist() == render_ids(tok, msgs, tools=TOOLS, add_generation_prompt=False)
  call = '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(2**10)"}}\n</tool_call>'
  assert runs(tok, ids, mask, 1) == [
    "<think>\nCompute.\n</think>\n\n" + call + "<|im_end|>",
    "<think>\nDone.\n</think>\n\n\\boxed{1024}<|im_end|>",
  ]
  untrained = "".join(runs(tok, ids, mask, 0))
  assert "1024\n</tool_response>" in untrained and "Be brief." in untrained

  # The SFT example is exactly the rollout the policy would have produced.
  traj = Trajectory(tok, render_ids(tok, msgs[:2], tools=TOOLS))
  traj.add_generated(tok.encode("<think>\nCompute.\n</think>\n\n" + call + "<|im_end|>", add_special_tokens=False))
  traj.add_tool_results("1024")
  traj.add_generated(tok.encode("<think>\nDone.\n</think>\n\n\\boxed{1024}<|im_end|>", add_special_tokens=False))
  t_ids, t_mask = traj.export()
  assert t_ids.tolist() == ids.tolist()[:-1] and t_mask.tolist() == mask.tolist()[:-1]


def test_inline_interpreter_output_is_masked(tok):
  answer = (
    "Compute it.\n<code>\n```python\nprint(2**10)\n```\n</code>\n<interpreter>\n1024\n</interpreter>\n\n"
    "So <answer>\\boxed{1024}</answer>"
  )
  msgs = [{"role": "user", "content": "2**10?"}, {"role": "assistant", "content": answer}]
  ids, mask = encode_sft(tok, msgs)
  trained = runs(tok, ids, mask, 1)
  assert trained == [
    "<think>\n\n</think>\n\nCompute.\n<code>\n```python\nprint(2**10)\n```\n</code>".replace(
      "Compute.", "Compute it."
    ),
    "So <answer>\\boxed{1024}</answer><|im_end|>",
  ]
  assert "\n<interpreter>\n1024\n</interpreter>\n\n" in runs(tok, ids, mask, 0)
  # Turning the masking off trains the whole assistant turn.
  _, plain = encode_sft(tok, msgs, inline_observations=False)
  assert len(runs(tok, ids, plain, 1)) == 1
  # Matches a retool-format rollout token for token.
  traj = Trajectory(tok, render_ids(tok, msgs[:1]), observation_format="retool")
  traj.add_generated(
    tok.encode("<think>\n\n</think>\n\nCompute it.\n<code>\n```python\nprint(2**10)\n```\n</code>")
  )
  traj.add_environment_text("\n<interpreter>\n1024\n</interpreter>\n\n")
  traj.add_generated(tok.encode("So <answer>\\boxed{1024}</answer><|im_end|>"))
  assert traj.export()[0].tolist() == ids.tolist()[:-1]
  assert traj.export()[1].tolist() == mask.tolist()[:-1]


def test_non_thinking_mode_keeps_empty_think_in_the_prompt(tok):
  msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
  assert "<think>\n\n</think>\n\n" in render_text(tok, msgs, add_generation_prompt=False)
  _, think_mask = encode_sft(tok, msgs)
  ids, mask = encode_sft(tok, msgs, enable_thinking=False)
  assert runs(tok, ids, mask, 1) == ["hello<|im_end|>"]
  assert runs(tok, ids, think_mask, 1) == ["<think>\n\n</think>\n\nhello<|im_end|>"]


def test_bad_input_is_named(tok):
  with pytest.raises(ValueError, match="no assistant turn"):
    encode_sft(tok, [{"role": "user", "content": "hi"}])
  with pytest.raises(TypeError, match=r"messages\[1\].content"):
    encode_sft(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}])
