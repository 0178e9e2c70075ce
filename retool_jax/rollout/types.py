"""What every generation engine takes and returns.

Log-probs follow SGLang's definition, so engines are interchangeable: the log-probability of the sampled token
under `log_softmax(logits / temperature)`, taken before top-p / top-k filtering (greedy: temperature 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, runtime_checkable


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = -1  # -1: no top-k filtering
  max_new_tokens: int = 256
  stop: tuple[str, ...] = ()  # stop strings (the matched string is kept in the output)
  stop_token_ids: tuple[int, ...] = ()  # e.g. <|im_end|>, </tool_call>; the stop token is kept
  seed: int | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
    if self.top_k == 0 or self.top_k < -1:
      raise ValueError(f"top_k={self.top_k} must be -1 (off) or >= 1")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
  """One generation call.

  Which weights generate it, when an engine holds several versions (the embedded engine during an
  asynchronous RL run): by default the newest at admission, kept to the end of the request; `weight_version`
  pins a version the engine still holds; `follow_updates` moves the request onto each newer version as it
  arrives, its KV cache kept (a partial rollout: its tokens then span versions, see
  `GenerateResult.output_versions`).
  """

  prompt_ids: tuple[int, ...]
  sampling: SamplingParams = SamplingParams()
  request_id: str | None = None
  deadline_s: float | None = None  # seconds after submission; then it ends with what it has (finish "abort")
  weight_version: int | str | None = None
  follow_updates: bool = False


@dataclasses.dataclass(frozen=True)
class FinishReason:
  type: str  # "stop" | "length" | "abort"
  matched: int | str | None = None  # the stop token id or stop string, for "stop"
  message: str | None = None  # why, for "abort"


@dataclasses.dataclass
class GenerateResult:
  """What a request generated. `weight_version` is the version it started on; `output_versions`, when given,
  is the version of every output token (None: all of them `weight_version`)."""

  output_ids: list[int]
  output_logprobs: list[float]  # one per output id
  finish_reason: FinishReason
  weight_version: str | int | None = None
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  output_versions: list[Any] | None = None

  def token_versions(self) -> list[Any]:
    """The version of every output token."""
    if self.output_versions is not None:
      return list(self.output_versions)
    return [self.weight_version] * len(self.output_ids)


@runtime_checkable
class Engine(Protocol):
  """A generation backend: the embedded JAX engine or an SGLang server."""

  async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]: ...

  async def update_weights(self, params: Any, version: int) -> None: ...

  async def health(self) -> bool: ...
