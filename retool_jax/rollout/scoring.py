"""Scoring rollouts and summing them up: rewards (verified correctness kept apart from the shaped reward) and the
per-batch rollout metrics (accuracy, format, tool use, lengths, truncation) that training and evaluation log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from retool_jax.rewards import score_batch
from retool_jax.rollout.multiturn import MultiTurnConfig, generate_multiturn


def reward_info(rollout: Any) -> dict[str, Any]:
  """What the reward function is told about how a response was produced."""
  finish = rollout.turns[-1].finish_reason if rollout.turns else None
  return {
    "num_tool_calls": rollout.tool_calls,
    "truncated": rollout.status == "truncated",
    "finish_reason": finish,
  }


def score_rollouts(reward_fn: Any, rollouts: Sequence[Any], answers: Sequence[str]) -> list[Any]:
  return score_batch(reward_fn, [r.text for r in rollouts], list(answers), [reward_info(r) for r in rollouts])


def rollout_stats(rollouts: Sequence[Any], results: Sequence[Any]) -> dict[str, np.ndarray]:
  """Per-trajectory figures `rollout_metrics` averages (arrays of one row per rollout, easy to gather)."""
  return {
    "reward": np.asarray([r.reward for r in results], np.float64),
    "correct": np.asarray([bool(r.correct) for r in results], bool),
    "format_ok": np.asarray([bool(r.format_ok) for r in results], bool),
    "tool_calls": np.asarray([r.tool_calls for r in rollouts], np.float64),
    "tool_errors": np.asarray([r.tool_errors for r in rollouts], np.float64),
    "policy_tokens": np.asarray([sum(r.loss_mask) for r in rollouts], np.float64),
    "truncated": np.asarray([r.status == "truncated" for r in rollouts], bool),
    "aborted": np.asarray([r.status == "aborted" for r in rollouts], bool),
  }


def metrics_of_stats(stats: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Batch means of `rollout_stats` (`accuracy` is verified correctness, never the reward)."""
  rewards, calls, tokens = stats["reward"], stats["tool_calls"], stats["policy_tokens"]
  return {
    "reward_mean": float(rewards.mean()),
    "reward_std": float(rewards.std()),
    "accuracy": float(np.mean(stats["correct"])),
    "format_ok": float(np.mean(stats["format_ok"])),
    "tool_calls_per_traj": float(calls.mean()),
    "tool_use_rate": float(np.mean(calls > 0)),
    "tool_error_rate": float(stats["tool_errors"].sum()) / max(float(calls.sum()), 1.0),
    "response_length": float(tokens.mean()),
    "response_length_max": float(tokens.max()),
    "truncation_rate": float(np.mean(stats["truncated"])),
    "abort_rate": float(np.mean(stats["aborted"])),
  }


def rollout_metrics(rollouts: Sequence[Any], results: Sequence[Any]) -> dict[str, float]:
  """Batch means of the rollouts and their scores (`accuracy` is verified correctness, never the reward)."""
  return metrics_of_stats(rollout_stats(rollouts, results))


async def rollout_and_score(
  engine: Any,
  prompts: Sequence[Any],
  answers: Sequence[str],
  tools: Any,
  multiturn: MultiTurnConfig,
  reward_fn: Any,
  tokenizer: Any,
) -> tuple[list, list]:
  rollouts = await generate_multiturn(engine, prompts, tools, multiturn, tokenizer=tokenizer)
  return rollouts, score_rollouts(reward_fn, rollouts, answers)


def evaluate(
  engine: Any,
  prompts: Sequence[Any],
  answers: Sequence[str],
  tools: Any,
  multiturn: MultiTurnConfig,
  reward_fn: Any,
  tokenizer: Any,
  *,
  samples: int = 1,
) -> dict[str, float]:
  """Rollout metrics of `samples` responses per prompt (held-out accuracy, format, tool use, ...)."""
  prompts = [p for p in prompts for _ in range(samples)]
  answers = [a for a in answers for _ in range(samples)]
  rollouts, results = asyncio.run(
    rollout_and_score(engine, prompts, answers, tools, multiturn, reward_fn, tokenizer)
  )
  return rollout_metrics(rollouts, results)
