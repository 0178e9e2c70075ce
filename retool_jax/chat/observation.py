"""Environment text that follows a policy turn: tool results and new user turns.

Two observation formats:

* ``qwen`` (default) closes the assistant turn and renders the results exactly as the Qwen3 template renders
  consecutive ``tool`` messages, then opens the next assistant turn::

      <|im_end|>\\n<|im_start|>user\\n<tool_response>\\nRESULT\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n

  The leading ``<|im_end|>`` is left out when the policy already generated it (generation stopped at EOS rather
  than at ``</tool_call>``).
* ``retool`` puts the interpreter output inline, right after the ``</code>`` that ended generation, as in the
  ReTool paper and its SFT data: ``\\n\\n<interpreter>\\nRESULT\\n</interpreter>\\n\\n``.
"""

from __future__ import annotations

from collections.abc import Sequence

from retool_jax.chat.tokenizer import (
  IM_END,
  IM_START,
  THINK_CLOSE,
  THINK_OPEN,
  TOOL_RESPONSE_CLOSE,
  TOOL_RESPONSE_OPEN,
)

OBSERVATION_FORMATS = ("qwen", "retool")
INTERPRETER_OPEN = "<interpreter>"
INTERPRETER_CLOSE = "</interpreter>"
# What the template puts after `<|im_start|>assistant\n` when thinking is disabled.
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"


def assistant_header(enable_thinking: bool = True) -> str:
  """Opens an assistant turn the way `add_generation_prompt=True` does."""
  return f"{IM_START}assistant\n" + ("" if enable_thinking else EMPTY_THINK)


def _close_turn(after_im_end: bool) -> str:
  return "\n" if after_im_end else f"{IM_END}\n"


def tool_observation(
  outputs: Sequence[str], fmt: str = "qwen", *, after_im_end: bool = False, enable_thinking: bool = True
) -> str:
  """The text appended after a policy turn that made tool calls, one output per call, in call order."""
  if isinstance(outputs, str):
    outputs = [outputs]
  outputs = [str(o) for o in outputs]
  if not outputs:
    raise ValueError("tool_observation needs at least one tool output")
  if fmt == "qwen":
    responses = "".join(f"\n{TOOL_RESPONSE_OPEN}\n{o}\n{TOOL_RESPONSE_CLOSE}" for o in outputs)
    return f"{_close_turn(after_im_end)}{IM_START}user{responses}{IM_END}\n{assistant_header(enable_thinking)}"
  if fmt == "retool":
    if after_im_end:
      raise ValueError("the retool format continues the assistant turn; it cannot follow <|im_end|>")
    return "".join(f"\n\n{INTERPRETER_OPEN}\n{o}\n{INTERPRETER_CLOSE}\n\n" for o in outputs)
  raise ValueError(f"unknown observation format {fmt!r}; expected one of {OBSERVATION_FORMATS}")


def user_observation(text: str, *, after_im_end: bool = False, enable_thinking: bool = True) -> str:
  """A new user turn after a finished assistant turn (multi-turn chat)."""
  return f"{_close_turn(after_im_end)}{IM_START}user\n{text}{IM_END}\n{assistant_header(enable_thinking)}"
