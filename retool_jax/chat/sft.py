"""Supervised examples: a message list -> `(ids, loss_mask)`, training only what the policy would generate.

The conversation is rendered once with the chat template. The text after each `<|im_start|>assistant\\n` up to
and including the turn's `<|im_end|>` is trained (mask 1); everything else - system, user, tool turns, the
turn headers, the newline after `<|im_end|>` - has mask 0. Inside assistant turns, inline interpreter output
(`<interpreter>...</interpreter>` with the whitespace around it, the ReTool format) is environment text and has
mask 0 too.

Each span is tokenised on its own, so token boundaries fall exactly where a rollout's do: the prompt ends with
`<|im_start|>assistant\\n`, generation stops at `</code>`, and the observation is tokenised separately. For
conversations without inline observations this equals tokenising the whole rendered text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from retool_jax.chat.observation import EMPTY_THINK, INTERPRETER_CLOSE, INTERPRETER_OPEN
from retool_jax.chat.render import render_text
from retool_jax.chat.tokenizer import IM_END, IM_START

ASSISTANT_HEADER = f"{IM_START}assistant\n"
_INLINE_OBSERVATION = re.compile(
  rf"\s*{re.escape(INTERPRETER_OPEN)}.*?(?:{re.escape(INTERPRETER_CLOSE)}\s*|$)", re.DOTALL
)


def trained_spans(
  text: str, *, enable_thinking: bool = True, inline_observations: bool = True
) -> list[tuple[int, int]]:
  """Character spans of `text` (a rendered conversation) that the policy generated."""
  spans = []
  start = text.find(ASSISTANT_HEADER)
  while start != -1:
    begin = start + len(ASSISTANT_HEADER)
    end = text.find(IM_END, begin)
    end = len(text) if end == -1 else end + len(IM_END)
    if not enable_thinking and text.startswith(EMPTY_THINK, begin):
      begin += len(EMPTY_THINK)  # part of the generation prompt when thinking is off
    if inline_observations:
      for match in _INLINE_OBSERVATION.finditer(text, begin, end):
        if match.start() > begin:
          spans.append((begin, match.start()))
        begin = match.end()
    if end > begin:
      spans.append((begin, end))
    start = text.find(ASSISTANT_HEADER, end)
  return spans


def encode_spans(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises `text` piece by piece at span boundaries; tokens inside `spans` get mask 1."""
  pieces: list[tuple[str, int]] = []
  cursor = 0
  for begin, end in [*spans, (len(text), len(text))]:
    pieces += [(text[cursor:begin], 0), (text[begin:end], 1)]
    cursor = end
  pieces = [(piece, bit) for piece, bit in pieces if piece]
  encoded = tokenizer([piece for piece, _ in pieces], add_special_tokens=False)["input_ids"] if pieces else []
  ids = [i for piece_ids in encoded for i in piece_ids]
  mask = [bit for piece_ids, (_, bit) in zip(encoded, pieces) for _ in piece_ids]
  return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def encode_sft(
  tokenizer: Any,
  messages: Sequence[Mapping[str, Any]],
  *,
  tools: Any = None,
  enable_thinking: bool = True,
  inline_observations: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """`(ids, loss_mask)` int32 arrays for one conversation; only assistant tokens (with `<|im_end|>`) are trained.

  `enable_thinking=False` treats the empty `<think>\\n\\n</think>\\n\\n` the template puts in the last assistant
  turn as prompt (that is where a non-thinking generation prompt puts it). `inline_observations=False`
  trains `<interpreter>` text like any other assistant text (only for data where the model wrote it).
  """
  text = render_text(
    tokenizer, messages, tools=tools, add_generation_prompt=False, enable_thinking=enable_thinking
  )
  if not any(m.get("role") == "assistant" for m in messages):
    raise ValueError("messages has no assistant turn: nothing to train on")
  spans = trained_spans(text, enable_thinking=enable_thinking, inline_observations=inline_observations)
  return encode_spans(tokenizer, text, spans)
