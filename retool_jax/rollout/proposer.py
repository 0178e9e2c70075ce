"""Toolformer's sampling step on an engine: a model proposes tool calls at candidate positions of a text.

The proposals feed `retool_jax.data.synth.teacher_examples`, which keeps the calls that help.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from retool_jax.chat.parse import parse_tool_calls
from retool_jax.chat.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, encode_text
from retool_jax.data.synth.teacher import ContextFn, Proposal, ProposeFn, number_positions
from retool_jax.rollout.types import GenerateRequest, SamplingParams


def engine_proposer(
  engine: Any,
  tokenizer: Any,
  *,
  registry: Any = None,
  context: ContextFn | None = None,
  positions: Callable[[str], Sequence[int]] = number_positions,
  max_new_tokens: int = 128,
  temperature: float = 0.0,
  seed: int | None = 0,
) -> ProposeFn:
  """A proposer that asks a model to write a call at each candidate position (Toolformer's sampling step).

  For each position `i` of `positions(response)`, the engine continues `context(prompt) + response[:i] +
  "<tool_call>\n"` up to `</tool_call>`; what it writes is parsed like any model output (with `registry`,
  unknown tools and invalid arguments are dropped), and every valid call becomes a `Proposal` at `i`. Works
  with any `Engine` (`generate(requests)` coroutine); call it from synchronous code.
  """
  close_ids = encode_text(tokenizer, TOOL_CALL_CLOSE)
  stop = {"stop_token_ids": tuple(close_ids)} if len(close_ids) == 1 else {"stop": (TOOL_CALL_CLOSE,)}
  sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, **stop)
  opening = f"{TOOL_CALL_OPEN}\n"

  def propose(prompt: str, response: str) -> list[Proposal]:
    head = context(prompt) if context is not None else prompt
    points = sorted({int(i) for i in positions(response) if 0 < int(i) <= len(response)})
    if not points:
      return []
    requests = [
      GenerateRequest(tuple(encode_text(tokenizer, head + response[:i] + opening)), sampling) for i in points
    ]
    results = asyncio.run(engine.generate(requests))
    proposals = []
    for i, result in zip(points, results):
      if result.finish_reason.type != "stop":
        continue  # ran out of tokens or failed: no complete call
      written = opening + tokenizer.decode(result.output_ids)
      for call in parse_tool_calls(written, registry, formats=("tool_call",)).calls:
        proposals.append(Proposal(i, call.name, dict(call.arguments)))
    return proposals

  return propose
