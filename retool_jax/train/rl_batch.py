"""From scored rollouts to the padded arrays a policy update trains on.

Trajectories are right-padded to a multiple of `length_multiple`, so a steady workload compiles a few
programs. Position `t` predicts token `t + 1`: `input_ids_BT` are the
ids without the last token, `targets_BT` without the first, and `mask_BT` / `rollout_logp_BT` are the loss mask
and engine log-probs of the targets. Prompt, tool-output and padding tokens have mask 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass
class TokenBatch:
  """Host arrays of one rollout batch (`[B, T]` unless noted)."""

  input_ids_BT: np.ndarray
  targets_BT: np.ndarray
  mask_BT: np.ndarray  # float32, 1 on policy-generated targets
  attention_mask_BT: np.ndarray  # int32, 1 on real (unpadded) inputs
  rollout_logp_BT: np.ndarray  # float32, the engine's log-probs of the targets (0 elsewhere)

  @property
  def shape(self) -> tuple[int, int]:
    return self.input_ids_BT.shape

  def select(self, rows: np.ndarray) -> "TokenBatch":
    return TokenBatch(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

  def arrays(self) -> dict[str, np.ndarray]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def bucket_length(n: int, length_multiple: int = 64) -> int:
  """`n` rounded up to a multiple of `length_multiple` (at least one multiple)."""
  return length_multiple * max(1, -(-n // length_multiple))


def pack_rollouts(
  rollouts: Sequence[Any], *, pad_id: int, length_multiple: int = 64, max_length: int | None = None
) -> TokenBatch:
  """Right-padded training arrays of `rollouts` (anything with `ids`, `loss_mask`, `logprobs`)."""
  if not rollouts:
    raise ValueError("pack_rollouts needs at least one rollout")
  longest = max(len(r.ids) for r in rollouts) - 1
  if longest < 1:
    raise ValueError("every rollout has fewer than two tokens: nothing to predict")
  t = bucket_length(longest, length_multiple)
  if max_length is not None:
    t = min(t, max(max_length, longest))
  b = len(rollouts)
  ids = np.full((b, t + 1), pad_id, np.int32)
  mask = np.zeros((b, t + 1), np.float32)
  logp = np.zeros((b, t + 1), np.float32)
  for i, r in enumerate(rollouts):
    if not len(r.ids) == len(r.loss_mask) == len(r.logprobs):
      raise ValueError(
        f"rollout {i}: ids, loss_mask and logprobs differ in length "
        f"({len(r.ids)}, {len(r.loss_mask)}, {len(r.logprobs)})"
      )
    n = len(r.ids)
    ids[i, :n] = r.ids
    mask[i, :n] = r.loss_mask
    logp[i, :n] = r.logprobs
  lengths = np.asarray([len(r.ids) - 1 for r in rollouts])
  attention = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
  return TokenBatch(ids[:, :-1], ids[:, 1:], mask[:, 1:], attention, logp[:, 1:])


def minibatch_indices(batch_size: int, num_minibatches: int, rng: np.random.Generator | None) -> list[np.ndarray]:
  """`num_minibatches` equal row sets covering `range(batch_size)` (shuffled when `rng` is given)."""
  if num_minibatches < 1 or batch_size % num_minibatches:
    raise ValueError(f"a batch of {batch_size} rows does not split into num_minibatches={num_minibatches}")
  order = rng.permutation(batch_size) if rng is not None else np.arange(batch_size)
  return list(order.reshape(num_minibatches, -1))
