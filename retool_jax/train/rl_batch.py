"""From scored rollouts to the padded arrays a policy update trains on.

Trajectories are right-padded to a multiple of `length_multiple`, so a steady workload compiles a few
programs. Position `t` predicts token `t + 1`: `input_ids_BT` are the
ids without the last token, `targets_BT` without the first, and `loss_mask_BT` / `rollout_logp_BT` are the loss
mask and engine log-probs of the targets. Prompt, tool-output and padding tokens have mask 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from retool_jax.data.batch import TokenBatch


@dataclasses.dataclass
class RolloutBatch:
  """Host arrays of one rollout batch: its token rows (one trajectory per row, right-padded: segment 1, then
  padding) and the engine's log-probs of their targets."""

  tokens: TokenBatch  # loss_mask_BT: float32, 1 on policy-generated targets
  rollout_logp_BT: np.ndarray  # float32, 0 off the policy's targets

  @property
  def shape(self) -> tuple[int, int]:
    return self.tokens.shape

  def select(self, rows: np.ndarray) -> "RolloutBatch":
    return RolloutBatch(self.tokens.rows(rows), self.rollout_logp_BT[rows])

  def arrays(self) -> dict[str, np.ndarray]:
    """`{field: array}`: the token fields and `rollout_logp_BT`, what the policy update reads."""
    return {**self.tokens.arrays(), "rollout_logp_BT": self.rollout_logp_BT}


def bucket_length(n: int, length_multiple: int = 64) -> int:
  """`n` rounded up to a multiple of `length_multiple` (at least one multiple)."""
  return length_multiple * max(1, -(-n // length_multiple))


def pack_rollouts(
  rollouts: Sequence[Any], *, pad_id: int, length_multiple: int = 64, max_length: int | None = None
) -> RolloutBatch:
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
  segments = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
  return RolloutBatch(TokenBatch(ids[:, :-1], ids[:, 1:], mask[:, 1:], segments, positions), logp[:, 1:])


def minibatch_indices(batch_size: int, num_minibatches: int, rng: np.random.Generator | None) -> list[np.ndarray]:
  """`num_minibatches` equal row sets covering `range(batch_size)` (shuffled when `rng` is given)."""
  if num_minibatches < 1 or batch_size % num_minibatches:
    raise ValueError(f"a batch of {batch_size} rows does not split into num_minibatches={num_minibatches}")
  order = rng.permutation(batch_size) if rng is not None else np.arange(batch_size)
  return list(order.reshape(num_minibatches, -1))
