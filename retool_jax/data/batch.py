"""`TokenBatch`: the token rows a trainer's loss reads, `[B, T]` arrays (numpy on the host, `jax.Array` on device).

Position `t` predicts `targets_BT[t]` from `input_ids_BT[: t + 1]` of its segment:

* `input_ids_BT` - tokens, padding after the last segment;
* `targets_BT` - the next token within the same segment (padding where there is none);
* `loss_mask_BT` - the weight of each target: 1 where it is trained, 0 on prompt and tool-output targets,
  on each segment's last token and on padding;
* `segment_ids_BT` - 1, 2, ... per example packed into the row, 0 on padding (tokens attend within a segment);
* `positions_BT` - restart at 0 in every segment.

A pytree (`jax.tree.map`, `jax.jit` arguments and shardings), so a batch is laid out on the mesh as a whole.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

FIELDS = ("input_ids_BT", "targets_BT", "loss_mask_BT", "segment_ids_BT", "positions_BT")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenBatch:
  """`[B, T]` token rows (see the module docstring)."""

  input_ids_BT: Any
  targets_BT: Any
  loss_mask_BT: Any
  segment_ids_BT: Any
  positions_BT: Any

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.input_ids_BT.shape)

  def __len__(self) -> int:
    return int(self.input_ids_BT.shape[0])

  def rows(self, index: Any) -> "TokenBatch":
    """The rows `index` selects (a slice, an index array or a mask) of every field."""
    return jax.tree.map(lambda x: x[index], self)

  def arrays(self) -> dict[str, Any]:
    """`{field: array}`."""
    return {name: getattr(self, name) for name in FIELDS}

  def num_loss_tokens(self) -> Any:
    """Targets with a nonzero loss weight."""
    return (self.loss_mask_BT > 0).sum()

  @classmethod
  def of(cls, fields: dict[str, Any]) -> "TokenBatch":
    """From `{field: array}`; a missing or unknown field is an error naming it."""
    unknown, missing = set(fields) - set(FIELDS), set(FIELDS) - set(fields)
    if unknown or missing:
      raise ValueError(
        f"TokenBatch fields: unknown {sorted(unknown)}, missing {sorted(missing)} (expected {FIELDS})"
      )
    return cls(**fields)

  @classmethod
  def zeros(cls, shape: tuple[int, int], pad_id: int) -> "TokenBatch":
    """An all-padding host batch of `shape`, to fill in."""
    ids = np.full(shape, pad_id, np.int32)
    return cls(ids, ids.copy(), *(np.zeros(shape, np.int32) for _ in range(3)))
