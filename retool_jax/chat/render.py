"""Prompt rendering with the model's own chat template (through `transformers`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from retool_jax.chat.tokenizer import TURN_MARKERS, encode_text

ROLES = ("system", "user", "assistant", "tool")


def tool_schemas(tools: Any) -> list[dict] | None:
  """Normalises `tools` (None, a list of OpenAI-style schemas, or a registry with `.schemas()`)."""
  if tools is None:
    return None
  if hasattr(tools, "schemas"):
    tools = tools.schemas()
  tools = list(tools)
  for i, schema in enumerate(tools):
    if not isinstance(schema, Mapping):
      raise TypeError(f"tools[{i}] must be a dict schema, got {type(schema).__name__}")
  return tools or None


def check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
  """Raises a ValueError naming the message and field when `messages` is not a plain chat list.

  Message text that already contains `<|im_start|>` / `<|im_end|>` means a template was applied before;
  rendering it again would nest turns, so it is rejected here.
  """
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
  if not messages:
    raise ValueError("messages is empty")
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise TypeError(f"messages[{i}] must be a dict, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
      raise ValueError(f"messages[{i}].role is {role!r}; expected one of {ROLES}")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
      raise TypeError(f"messages[{i}].content must be a string or None, got {type(content).__name__}")
    for marker in TURN_MARKERS:
      if content and marker in content:
        raise ValueError(
          f"messages[{i}].content contains {marker!r}: the text looks already rendered by a chat "
          "template; pass plain messages"
        )


def render_text(
  tokenizer: Any,
  messages: Sequence[Mapping[str, Any]],
  *,
  tools: Any = None,
  add_generation_prompt: bool = True,
  enable_thinking: bool = True,
) -> str:
  """The chat template applied to `messages` (and tool schemas), as text."""
  check_messages(messages)
  return tokenizer.apply_chat_template(
    [dict(m) for m in messages],
    tools=tool_schemas(tools),
    tokenize=False,
    add_generation_prompt=add_generation_prompt,
    enable_thinking=enable_thinking,
  )


def render_ids(
  tokenizer: Any,
  messages: Sequence[Mapping[str, Any]],
  *,
  tools: Any = None,
  add_generation_prompt: bool = True,
  enable_thinking: bool = True,
) -> list[int]:
  """The chat template applied to `messages`, as token ids (what a rollout starts from)."""
  text = render_text(
    tokenizer,
    messages,
    tools=tools,
    add_generation_prompt=add_generation_prompt,
    enable_thinking=enable_thinking,
  )
  return encode_text(tokenizer, text)
