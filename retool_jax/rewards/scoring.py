"""Scoring a batch of responses, and batch summaries that keep accuracy apart from reward."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping, Sequence
from typing import Any

from retool_jax.rewards.result import RewardFn, RewardResult, TrajectoryInfo


def score_batch(
  reward_fn: RewardFn,
  responses: Sequence[str],
  ground_truths: Sequence[str],
  infos: Sequence[TrajectoryInfo | Mapping[str, Any] | None] | None = None,
  *,
  num_threads: int = 1,
) -> list[RewardResult]:
  """``reward_fn`` on every (response, ground truth, info), in order.

  ``num_threads`` > 1 overlaps calls; pair it with a verifier that has as many workers.
  """
  if len(responses) != len(ground_truths):
    raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
  if infos is None:
    infos = [None] * len(responses)
  elif len(infos) != len(responses):
    raise ValueError(f"{len(responses)} responses but {len(infos)} trajectory infos")
  if num_threads <= 1:
    return [reward_fn(r, g, i) for r, g, i in zip(responses, ground_truths, infos)]
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    return list(pool.map(reward_fn, responses, ground_truths, infos))


def summarize(results: Sequence[RewardResult]) -> dict[str, float]:
  """Batch means: ``accuracy`` (verified correctness), ``reward`` (shaped), ``format_ok``,
  ``answer_found``, and every per-sample metric."""
  if not results:
    raise ValueError("summarize needs at least one RewardResult")
  n = len(results)
  summary = {
    "accuracy": sum(r.correct for r in results) / n,
    "reward": sum(r.reward for r in results) / n,
    "format_ok": sum(r.format_ok for r in results) / n,
    "answer_found": sum(r.extracted is not None for r in results) / n,
  }
  for key in sorted({key for r in results for key in r.metrics}):
    values = [r.metrics[key] for r in results if key in r.metrics]
    summary[key] = sum(values) / len(values)
  return summary
