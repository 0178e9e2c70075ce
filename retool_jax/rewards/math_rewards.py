"""Built-in rewards for math answers: verified correctness (optionally tool-shaped) and format."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from retool_jax.rewards import extract, verify
from retool_jax.rewards.result import RewardResult, TrajectoryInfo, as_info

AnswerFormat = Literal["any", "boxed", "retool", "dapo"]
ANSWER_FORMATS = ("any", "boxed", "retool", "dapo")


def check_options(mode: str, answer_format: str) -> None:
  """Raises ValueError naming a ``mode`` or ``answer_format`` that does not exist."""
  if mode not in verify.MODES:
    raise ValueError(f"mode must be one of {verify.MODES}, got {mode!r}")
  if answer_format not in ANSWER_FORMATS:
    raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")


def format_ok(
  response: str,
  extraction: extract.Extraction | None,
  info: TrajectoryInfo,
  answer_format: AnswerFormat,
) -> bool:
  """Whether ``response`` finished, closed its tags and gave its answer in ``answer_format``.

  ``"any"``: any recognised form; ``"boxed"``: inside ``\\boxed{}``; ``"retool"``: an
  ``<answer>`` tag holding ``\\boxed{}``; ``"dapo"``: an ``Answer:`` line.
  """
  if extraction is None or info.truncated or not extract.tags_balanced(response):
    return False
  if answer_format == "boxed":
    return extraction.boxed
  if answer_format == "retool":
    return extraction.source == "answer_tag" and extraction.boxed
  if answer_format == "dapo":
    return extraction.source == "answer_line"
  return True


@dataclasses.dataclass(frozen=True)
class Graded:
  """A response checked against its ground truth, before any reward is assigned."""

  extraction: extract.Extraction | None
  verdict: verify.Verdict
  info: TrajectoryInfo
  format_ok: bool

  def result(self, reward: float) -> RewardResult:
    return RewardResult(
      reward=float(reward),
      correct=self.verdict.correct,
      extracted=None if self.extraction is None else self.extraction.answer,
      format_ok=self.format_ok,
      metrics={
        "num_tool_calls": float(self.info.num_tool_calls),
        "truncated": float(self.info.truncated),
        "verify_timeout": float(self.verdict.timed_out),
      },
    )


def grade(
  response: str,
  ground_truth: str,
  info: TrajectoryInfo | Mapping[str, Any] | None = None,
  *,
  mode: verify.Mode = "lenient",
  answer_format: AnswerFormat = "any",
  verifier: verify.Verifier | None = None,
  grade_truncated: bool = False,
) -> Graded:
  """Extracts the answer of ``response``, verifies it and checks its format.

  A response cut by the length limit (``info.truncated``) has no final answer and is wrong, whatever box it
  wrote before the cut (its extraction is still reported); ``grade_truncated=True`` grades it like a
  finished one.
  """
  check_options(mode, answer_format)
  info = as_info(info)
  extraction, verdict = verify.judge(response, ground_truth, mode, verifier=verifier)
  if info.truncated and not grade_truncated:
    verdict = verify.Verdict(False)
  return Graded(extraction, verdict, info, format_ok(response, extraction, info, answer_format))


class _GradingReward:
  """A reward computed from a graded response: ``score`` maps the grading to a number."""

  mode: verify.Mode
  answer_format: AnswerFormat
  verifier: verify.Verifier | None
  grade_truncated: bool

  def __post_init__(self):
    check_options(self.mode, self.answer_format)

  def __call__(
    self,
    response: str,
    ground_truth: str,
    info: TrajectoryInfo | Mapping[str, Any] | None = None,
  ) -> RewardResult:
    graded = grade(
      response,
      ground_truth,
      info,
      mode=self.mode,
      answer_format=self.answer_format,
      verifier=self.verifier,
      grade_truncated=self.grade_truncated,
    )
    return graded.result(self.score(graded))

  def score(self, graded: Graded) -> float:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class MathReward(_GradingReward):
  """``correct_reward`` for a verified-correct answer, ``wrong_reward`` otherwise.

  With ``tool_shaping`` (ReTool), a wrong answer after ``k`` tool calls scores
  ``min(shaped_wrong_cap, wrong_reward + tool_call_bonus * k)`` -- by default
  ``min(-0.6, -1 + 0.1 k)`` -- which rewards trying the interpreter without ever reaching the
  score of a correct answer. A response with no final answer is wrong, and so is one cut by the length limit
  unless ``grade_truncated`` (see :func:`grade`).
  """

  mode: verify.Mode = "lenient"
  correct_reward: float = 1.0
  wrong_reward: float = -1.0
  tool_shaping: bool = False
  tool_call_bonus: float = 0.1
  shaped_wrong_cap: float = -0.6
  answer_format: AnswerFormat = "any"
  verifier: verify.Verifier | None = None
  grade_truncated: bool = False

  def score(self, graded: Graded) -> float:
    if graded.verdict.correct:
      return self.correct_reward
    if self.tool_shaping:
      shaped = self.wrong_reward + self.tool_call_bonus * graded.info.num_tool_calls
      return min(self.shaped_wrong_cap, shaped)
    return self.wrong_reward


@dataclasses.dataclass(frozen=True)
class FormatReward(_GradingReward):
  """``ok_reward`` if the response is well formed (see :func:`format_ok`), else ``bad_reward``.

  Its ``correct`` field is still the verified correctness of the answer.
  """

  answer_format: AnswerFormat = "retool"
  ok_reward: float = 1.0
  bad_reward: float = 0.0
  mode: verify.Mode = "lenient"
  verifier: verify.Verifier | None = None
  grade_truncated: bool = False

  def score(self, graded: Graded) -> float:
    return self.ok_reward if graded.format_ok else self.bad_reward


def retool_reward(**overrides: Any) -> MathReward:
  """The ReTool reward: correctness with tool-use shaping, ``<answer>\\boxed{}</answer>`` format."""
  return MathReward(**{"tool_shaping": True, "answer_format": "retool", **overrides})
