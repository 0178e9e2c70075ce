"""A scripted, imperfect teacher policy, played through the real multi-turn tool loop to make SFT data.

The teacher is an `Engine`: `generate_multiturn(TeacherEngine(...), prompts, tools, config)` produces
trajectories exactly as a model's rollouts would be built (same tokenisation, same observation text), and every
interpreter output in them comes from running the teacher's code in the sandbox. The teacher is deliberately
imperfect, so SFT leaves room for RL: with probability `1 - tool_rate` it answers from a mental estimate
(`a` rounded to hundreds) instead of calling the interpreter, and with probability `slip_rate` it copies the
interpreter's output with one digit wrong.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from retool_jax.demo_task.task import Problem, answer_turn, code_turn, prompt_ids
from retool_jax.rollout import generate_multiturn
from retool_jax.rollout.types import FinishReason, GenerateRequest, GenerateResult

_INTERPRETER = re.compile(r"<interpreter>\n(.*?)\n</interpreter>", re.S)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  tool_rate: float = 0.6  # how often the teacher calls the interpreter rather than estimating
  slip_rate: float = 0.25  # how often it copies the interpreter's output with one digit wrong

  def __post_init__(self):
    for name in ("tool_rate", "slip_rate"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"TeacherConfig.{name}={getattr(self, name)} must be in [0, 1]")


def estimate(problem: Problem) -> str:
  """A mental estimate: `a` rounded to the nearest hundred."""
  return str(round(problem.a, -2) * problem.b)


def slip(answer: str, rng: np.random.Generator) -> str:
  """`answer` with one digit replaced by a different one (the leading digit stays non-zero)."""
  i = int(rng.integers(len(answer)))
  choices = [d for d in "0123456789" if d != answer[i] and not (i == 0 and d == "0")]
  return answer[:i] + str(rng.choice(choices)) + answer[i + 1 :]


class TeacherEngine:
  """Plays the teacher for trajectory `i` (request ids `"{i}-{turn}"`) of `problems`."""

  def __init__(self, tokenizer: Any, problems: Sequence[Problem], config: TeacherConfig, seed: int):
    self.tokenizer = tokenizer
    self.problems = list(problems)
    rng = np.random.default_rng(seed)
    self.uses_tool = rng.random(len(self.problems)) < config.tool_rate
    self.slips = rng.random(len(self.problems)) < config.slip_rate
    self.seed = seed
    self.weight_version = "teacher"

  async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
    return [self._one(r) for r in requests]

  async def update_weights(self, params: Any, version: int) -> None:
    raise TypeError("the teacher has no weights")

  async def health(self) -> bool:
    return True

  def _one(self, request: GenerateRequest) -> GenerateResult:
    index, turn = (int(x) for x in request.request_id.split("-"))
    problem = self.problems[index]
    if not self.uses_tool[index]:
      text = answer_turn(estimate(problem))
    elif turn == 0:
      text = code_turn(problem)
    else:
      seen = _INTERPRETER.findall(self.tokenizer.decode(list(request.prompt_ids)))
      result = seen[-1].strip() if seen else estimate(problem)
      if self.slips[index] and result.isdigit():
        # a generator per trajectory: the data must not depend on the order the sandbox finishes calls in
        result = slip(result, np.random.default_rng([self.seed, index]))
      text = answer_turn(result)
    ids = self.tokenizer.encode(text, add_special_tokens=False)
    matched = "</code>" if text.endswith("</code>") else ids[-1]
    return GenerateResult(ids, [0.0] * len(ids), FinishReason("stop", matched=matched), self.weight_version)


async def teacher_rollouts(
  tokenizer: Any, problems: Sequence[Problem], tools: Any, multiturn: Any, config: TeacherConfig, seed: int
) -> list:
  """The teacher's trajectories on `problems`, tool calls executed by `tools`."""
  engine = TeacherEngine(tokenizer, problems, config, seed)
  prompts = [prompt_ids(tokenizer, p) for p in problems]
  return await generate_multiturn(engine, prompts, tools, multiturn, tokenizer=tokenizer)


def run(coro):
  """Runs a coroutine from synchronous code."""
  return asyncio.run(coro)
