"""Tokenizer loading (cached) and the Qwen special tokens the chat layer relies on."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Markers that delimit turns. Message text that contains them would be read as structure, not content.
TURN_MARKERS = (IM_START, IM_END)


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
  """Loads a Hugging Face tokenizer once per process (later calls return the same object)."""
  return _load_tokenizer(os.fspath(name_or_path))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(name_or_path: str) -> Any:
  # transformers' tokenizer import brings in torch (seconds): only loading a tokenizer pays for it.
  from transformers import AutoTokenizer  # noqa: PLC0415

  tokenizer = AutoTokenizer.from_pretrained(name_or_path)
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"tokenizer at {name_or_path!r} has no chat template")
  return tokenizer


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Ids of the single-token markers of the Qwen chat format."""

  im_start: int
  im_end: int
  tool_call_open: int
  tool_call_close: int
  tool_response_open: int
  tool_response_close: int
  think_open: int
  think_close: int
  pad: int

  @classmethod
  def from_tokenizer(cls, tokenizer: Any) -> "SpecialIds":
    return _special_ids(tokenizer)


@functools.lru_cache(maxsize=8)
def _special_ids(tokenizer: Any) -> SpecialIds:
  def single(token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
      raise ValueError(f"{token!r} is not a single token in this tokenizer (got {ids})")
    return ids[0]

  pad = tokenizer.pad_token_id
  return SpecialIds(
    im_start=single(IM_START),
    im_end=single(IM_END),
    tool_call_open=single(TOOL_CALL_OPEN),
    tool_call_close=single(TOOL_CALL_CLOSE),
    tool_response_open=single(TOOL_RESPONSE_OPEN),
    tool_response_close=single(TOOL_RESPONSE_CLOSE),
    think_open=single(THINK_OPEN),
    think_close=single(THINK_CLOSE),
    pad=pad if pad is not None else single(IM_END),
  )


def encode_text(tokenizer: Any, text: str) -> list[int]:
  """Token ids of environment text, exactly as they appear inside a rendered template (no BOS/EOS added)."""
  return list(tokenizer.encode(text, add_special_tokens=False)) if text else []
