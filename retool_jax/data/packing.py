"""Sequence packing for SFT: several `(ids, loss_mask)` examples per fixed-length row of a `TokenBatch`.

A target's loss weight is the example's mask bit of the *target* token, so a prompt or tool-output token is
never a target; positions are 0 on padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from retool_jax.data.batch import TokenBatch

OVERFLOW = ("truncate", "drop", "error")


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """`[N, T]` int32 token rows and which examples each row holds."""

  tokens: TokenBatch
  examples: tuple[tuple[int, ...], ...]

  def __len__(self) -> int:
    return len(self.tokens)

  def batches(self, batch_size: int, *, drop_remainder: bool = True) -> Iterator[TokenBatch]:
    """Consecutive `[batch_size, T]` batches."""
    stop = len(self) - len(self) % batch_size if drop_remainder else len(self)
    for start in range(0, stop, batch_size):
      yield self.tokens.rows(slice(start, start + batch_size))


def _fit(
  examples: Iterable[tuple[Sequence[int], Sequence[int]]], seq_len: int, overflow: str
) -> list[tuple[int, np.ndarray, np.ndarray]]:
  kept = []
  for index, (ids, mask) in enumerate(examples):
    ids, mask = np.asarray(ids, np.int32).reshape(-1), np.asarray(mask, np.int32).reshape(-1)
    if ids.shape != mask.shape:
      raise ValueError(f"example {index}: {ids.size} ids but {mask.size} loss-mask bits")
    if ids.size < 2:
      continue  # nothing to predict
    if ids.size > seq_len:
      if overflow == "error":
        raise ValueError(f"example {index} has {ids.size} tokens, more than seq_len={seq_len}")
      if overflow == "drop":
        continue
      ids, mask = ids[:seq_len], mask[:seq_len]
    if mask[1:].any():
      kept.append((index, ids, mask))
  return kept


def pack_sequences(
  examples: Iterable[tuple[Sequence[int], Sequence[int]]],
  seq_len: int,
  *,
  pad_id: int,
  overflow: str = "truncate",
) -> PackedRows:
  """Packs examples into rows of `seq_len` tokens, first-fit in decreasing length.

  `overflow` handles examples longer than `seq_len`: ``truncate`` (keep the start), ``drop`` or ``error``.
  Examples with no trained target are skipped; `pad_id` fills the
  rest of each row (the tokenizer's pad id).
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be at least 2, got {seq_len}")
  if overflow not in OVERFLOW:
    raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
  kept = _fit(examples, seq_len, overflow)
  rows: list[list[int]] = []  # example slots per row
  free: list[int] = []
  for slot in sorted(range(len(kept)), key=lambda k: -kept[k][1].size):
    size = kept[slot][1].size
    row = next((r for r, space in enumerate(free) if space >= size), None)
    if row is None:
      rows.append([])
      free.append(seq_len)
      row = len(rows) - 1
    rows[row].append(slot)
    free[row] -= size

  for slots in rows:
    slots.sort()  # source order inside a row
  rows.sort()  # and rows in the order of their first example
  shape = (len(rows), seq_len)
  out = TokenBatch.zeros(shape, pad_id)
  members = []
  for r, slots in enumerate(rows):
    start = 0
    for segment, slot in enumerate(slots, start=1):
      _, ids, mask = kept[slot]
      end = start + ids.size
      out.input_ids_BT[r, start:end] = ids
      out.targets_BT[r, start : end - 1] = ids[1:]
      out.loss_mask_BT[r, start : end - 1] = mask[1:]
      out.segment_ids_BT[r, start:end] = segment
      out.positions_BT[r, start:end] = np.arange(ids.size, dtype=np.int32)
      start = end
    members.append(tuple(kept[slot][0] for slot in slots))
  return PackedRows(out, examples=tuple(members))
