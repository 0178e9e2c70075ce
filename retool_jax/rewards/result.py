"""What a reward function receives besides the text, and what it returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

from retool_jax.fields import dataclass_kwargs


@dataclasses.dataclass(frozen=True)
class TrajectoryInfo:
  """Facts about how a response was produced.

  Attributes:
    num_tool_calls: tool calls the model made (code cells run, for ReTool).
    truncated: whether generation hit the length limit before the model finished; implied by
      ``finish_reason == "length"``.
    finish_reason: the engine's reason for stopping (e.g. ``"stop"``, ``"length"``), if known.
  """

  num_tool_calls: int = 0
  truncated: bool = False
  finish_reason: str | None = None

  def __post_init__(self):
    if self.num_tool_calls < 0:
      raise ValueError(f"num_tool_calls must be >= 0, got {self.num_tool_calls}")
    if self.finish_reason == "length":
      object.__setattr__(self, "truncated", True)

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> TrajectoryInfo:
    """Builds one from a dict, naming any key it does not know."""
    return cls(**dataclass_kwargs(cls, values, "trajectory info"))


def as_info(info: TrajectoryInfo | Mapping[str, Any] | None) -> TrajectoryInfo:
  """``info`` as a :class:`TrajectoryInfo` (None means no tool calls, not truncated)."""
  if info is None:
    return TrajectoryInfo()
  if isinstance(info, TrajectoryInfo):
    return info
  if isinstance(info, Mapping):
    return TrajectoryInfo.from_mapping(info)
  raise TypeError(f"info must be a TrajectoryInfo, a mapping or None, got {type(info).__name__}")


@dataclasses.dataclass(frozen=True)
class RewardResult:
  """The score of one response.

  Attributes:
    reward: the (possibly shaped) training signal.
    correct: whether the final answer was verified equal to the ground truth. Accuracy is the
      mean of this field, never of ``reward``.
    extracted: the final answer found in the response, or None.
    format_ok: whether the response had a final answer in the expected form, closed its tags
      and was not truncated.
    metrics: extra per-sample numbers to log.
  """

  reward: float
  correct: bool
  extracted: str | None
  format_ok: bool
  metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)


class RewardFn(Protocol):
  """A reward function: ``fn(response, ground_truth, info) -> RewardResult``."""

  def __call__(self, response: str, ground_truth: str, info: TrajectoryInfo | None = None) -> RewardResult: ...
