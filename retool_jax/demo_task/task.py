"""The demo task: multi-digit multiplication that is hard to do in the head and easy with a Python interpreter.

    problems = make_problems(512, seed=0)                   # "Compute 482 * 93."  ->  "44826"
    prompt_ids(tokenizer, problems[0])                      # the Qwen3 chat prompt (non-thinking)

The intended solution calls the interpreter once, ReTool style, and copies its output into the answer:

    <code>print(482*93)</code>

    <interpreter>
    44826
    </interpreter>

    <answer>\\boxed{44826}</answer><|im_end|>
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from retool_jax.chat import render_ids


@dataclasses.dataclass(frozen=True)
class Problem:
  """`a * b`, asked in words; `answer` is the exact product as text."""

  a: int
  b: int

  @property
  def question(self) -> str:
    return f"Compute {self.a} * {self.b}."

  @property
  def expression(self) -> str:
    return f"{self.a} * {self.b}"

  @property
  def answer(self) -> str:
    return str(self.a * self.b)


def make_problems(n: int, seed: int, *, exclude: Sequence[Problem] = ()) -> list[Problem]:
  """`n` distinct problems (a: 3 digits, b: 2 digits), none of them in `exclude`."""
  if n < 1:
    raise ValueError(f"make_problems needs n >= 1, got {n}")
  rng = np.random.default_rng(seed)
  seen = set(exclude)
  out: list[Problem] = []
  while len(out) < n:
    p = Problem(int(rng.integers(100, 1000)), int(rng.integers(10, 100)))
    if p not in seen:
      seen.add(p)
      out.append(p)
  return out


def prompt_messages(problem: Problem) -> list[dict[str, str]]:
  return [{"role": "user", "content": problem.question}]


def prompt_ids(tokenizer: Any, problem: Problem) -> list[int]:
  """The rendered prompt, ending with the assistant header."""
  return render_ids(tokenizer, prompt_messages(problem), add_generation_prompt=True)


def code_turn(problem: Problem) -> str:
  """The policy text that asks the interpreter for the result."""
  return f"<code>print({problem.a}*{problem.b})</code>"


def answer_turn(answer: str) -> str:
  """The closing text of a response that answers `answer`."""
  return f"<answer>\\boxed{{{answer}}}</answer><|im_end|>"
