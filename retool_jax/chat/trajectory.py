"""Token-level assembly of multi-turn tool-use trajectories.

A trajectory starts from rendered prompt ids. Ids the policy generated are appended as they are (never decoded
and re-tokenised) with loss-mask 1; environment text (tool results, user turns) is tokenised on its own, as the
chat template renders it, with loss-mask 0. Every token carries its mask bit and, for generated tokens, the
sampling log-probability when the engine reports it.

The ids equal the template applied to the final message list, with one known difference: Qwen3's template
drops the `<think>` content of assistant turns before the last user query, while a trajectory keeps what the
policy actually generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from retool_jax.chat.observation import OBSERVATION_FORMATS, tool_observation, user_observation
from retool_jax.chat.tokenizer import SpecialIds, encode_text


class Trajectory:
  """Builds `(ids, loss_mask)` for one rollout, turn by turn.

  Example::

      traj = Trajectory(tokenizer, render_ids(tokenizer, prompt, tools=registry))
      traj.add_generated(engine_output_ids, logprobs)
      traj.add_tool_results([result.output])        # format from `observation_format`
      traj.add_generated(more_ids)
      ids, loss_mask = traj.export()
  """

  def __init__(
    self,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    *,
    observation_format: str = "qwen",
    enable_thinking: bool = True,
  ):
    if observation_format not in OBSERVATION_FORMATS:
      raise ValueError(f"unknown observation format {observation_format!r}; expected one of {OBSERVATION_FORMATS}")
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
      raise ValueError("prompt_ids is empty")
    self.tokenizer = tokenizer
    self.observation_format = observation_format
    self.enable_thinking = enable_thinking
    self.special = SpecialIds.from_tokenizer(tokenizer)
    self.num_prompt_tokens = len(prompt_ids)
    self.ids: list[int] = prompt_ids
    self.loss_mask: list[int] = [0] * len(prompt_ids)
    self.logprobs: list[float] = [0.0] * len(prompt_ids)
    self.num_policy_turns = 0
    self.num_observations = 0

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def ends_turn(self) -> bool:
    """Whether the last token closes an assistant turn (`<|im_end|>`)."""
    return self.ids[-1] == self.special.im_end

  def add_generated(self, ids: Sequence[int], logprobs: Sequence[float] | None = None) -> None:
    """Appends what the policy generated (loss-mask 1)."""
    ids = [int(i) for i in ids]
    if logprobs is not None and len(logprobs) != len(ids):
      raise ValueError(f"got {len(ids)} generated ids but {len(logprobs)} logprobs")
    self.ids += ids
    self.loss_mask += [1] * len(ids)
    self.logprobs += [float(x) for x in logprobs] if logprobs is not None else [0.0] * len(ids)
    self.num_policy_turns += 1

  def add_environment_text(self, text: str) -> list[int]:
    """Appends environment text tokenised on its own (loss-mask 0); returns its ids."""
    ids = encode_text(self.tokenizer, text)
    self.ids += ids
    self.loss_mask += [0] * len(ids)
    self.logprobs += [0.0] * len(ids)
    return ids

  def add_tool_results(self, outputs: Sequence[str] | str, fmt: str | None = None) -> list[int]:
    """Appends tool outputs (one per call, in call order) in the trajectory's observation format."""
    text = tool_observation(
      outputs,
      fmt or self.observation_format,
      after_im_end=self.ends_turn,
      enable_thinking=self.enable_thinking,
    )
    self.num_observations += 1
    return self.add_environment_text(text)

  def add_user(self, text: str) -> list[int]:
    """Appends a new user turn and opens the next assistant turn."""
    return self.add_environment_text(
      user_observation(text, after_im_end=self.ends_turn, enable_thinking=self.enable_thinking)
    )

  def drop(self, start: int, stop: int) -> None:
    """Removes `ids[start:stop]` with their mask bits and log-probs (a chat's oldest turns, say)."""
    if not 0 <= start <= stop <= len(self.ids):
      raise ValueError(f"cannot drop [{start}, {stop}) of a {len(self.ids)}-token trajectory")
    del self.ids[start:stop], self.loss_mask[start:stop], self.logprobs[start:stop]
    self.num_prompt_tokens -= max(0, min(stop, self.num_prompt_tokens) - start)

  def export(self) -> tuple[np.ndarray, np.ndarray]:
    """`(ids, loss_mask)` as int32 arrays of equal length."""
    return np.asarray(self.ids, np.int32), np.asarray(self.loss_mask, np.int32)

  @property
  def response_ids(self) -> list[int]:
    return self.ids[self.num_prompt_tokens :]

  @property
  def response_mask(self) -> list[int]:
    return self.loss_mask[self.num_prompt_tokens :]

  def text(self) -> str:
    """The whole trajectory decoded (for logs and debugging, never for training)."""
    return self.tokenizer.decode(self.ids)
