"""Chat format: rendering, tool-call parsing and token-exact trajectory / SFT assembly."""

from retool_jax.chat.calls import call_outputs
from retool_jax.chat.observation import (
  OBSERVATION_FORMATS,
  assistant_header,
  tool_observation,
  user_observation,
)
from retool_jax.chat.parse import CODE_TOOL, CallError, ParseResult, ToolCall, parse_tool_calls
from retool_jax.chat.render import check_messages, render_ids, render_text, tool_schemas
from retool_jax.chat.sft import encode_sft, trained_spans
from retool_jax.chat.tokenizer import SpecialIds, encode_text, load_tokenizer
from retool_jax.chat.trajectory import Trajectory

__all__ = [
  "CODE_TOOL",
  "OBSERVATION_FORMATS",
  "CallError",
  "ParseResult",
  "SpecialIds",
  "ToolCall",
  "Trajectory",
  "assistant_header",
  "call_outputs",
  "check_messages",
  "encode_sft",
  "encode_text",
  "load_tokenizer",
  "parse_tool_calls",
  "render_ids",
  "render_text",
  "tool_observation",
  "tool_schemas",
  "trained_spans",
  "user_observation",
]
