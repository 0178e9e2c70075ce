"""The internal records every loader produces."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from retool_jax.chat.sft import encode_sft

Message = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Example:
  """A problem for RL or evaluation: the prompt messages, the reference answer, and where it came from.

  `ground_truth` is a string, the form reward functions compare against.
  """

  prompt: list[Message]
  ground_truth: str
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ChatExample:
  """A conversation to train on with SFT: messages (OpenAI style) and the tool schemas shown to the model."""

  messages: list[Message]
  tools: list[dict[str, Any]] | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def encode(self, tokenizer: Any, *, enable_thinking: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`(ids, loss_mask)`: only assistant tokens are trained, tool output never is."""
    return encode_sft(tokenizer, self.messages, tools=self.tools, enable_thinking=enable_thinking)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """A DPO pair: a shared prompt and two alternative assistant continuations."""

  prompt: list[Message]
  chosen: list[Message]
  rejected: list[Message]
  tools: list[dict[str, Any]] | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def encode(
    self, tokenizer: Any, *, enable_thinking: bool = True
  ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """`((chosen_ids, chosen_mask), (rejected_ids, rejected_mask))`; prompt tokens have mask 0."""
    return tuple(  # type: ignore[return-value]
      encode_sft(tokenizer, self.prompt + side, tools=self.tools, enable_thinking=enable_thinking)
      for side in (self.chosen, self.rejected)
    )
