"""SFT packing: segment ids, per-segment positions, shifted targets and the loss mask carried through."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retool_jax.data import pack_sequences
from retool_jax.data.batch import FIELDS


def example(n, start, prompt):
  ids = np.arange(start, start + n, dtype=np.int32)
  mask = np.array([0] * prompt + [1] * (n - prompt), np.int32)
  return ids, mask


def test_layout():
  a, b, c = example(5, 100, 2), example(3, 200, 1), example(6, 300, 3)
  packed = pack_sequences([a, b, c], 8, pad_id=0)
  assert len(packed) == 2 and packed.examples == ((0, 1), (2,))
  row = {name.removesuffix("_BT"): getattr(packed.tokens, name)[0].tolist() for name in FIELDS}
  assert row["input_ids"] == [100, 101, 102, 103, 104, 200, 201, 202]
  assert row["segment_ids"] == [1, 1, 1, 1, 1, 2, 2, 2]
  assert row["positions"] == [0, 1, 2, 3, 4, 0, 1, 2]
  # targets stay inside their segment; the mask is that of the target token
  assert row["targets"] == [101, 102, 103, 104, 0, 201, 202, 0]
  assert row["loss_mask"] == [0, 1, 1, 1, 0, 1, 1, 0]
  row = {name.removesuffix("_BT"): getattr(packed.tokens, name)[1].tolist() for name in FIELDS}
  assert row["segment_ids"] == [1] * 6 + [0, 0] and row["positions"] == [0, 1, 2, 3, 4, 5, 0, 0]
  assert row["input_ids"][6:] == [0, 0] and row["loss_mask"] == [0, 0, 1, 1, 1, 0, 0, 0]
  assert all(getattr(packed.tokens, name).dtype == np.int32 for name in FIELDS)


def test_overflow_and_skips():
  long, short = example(10, 1, 2), example(3, 50, 1)
  assert pack_sequences([long, short], 6, pad_id=0).tokens.input_ids_BT[0].tolist()[:6] == [1, 2, 3, 4, 5, 6]
  assert pack_sequences([long, short], 6, pad_id=0, overflow="drop").examples == ((1,),)
  with pytest.raises(ValueError, match="example 0 has 10 tokens, more than seq_len=6"):
    pack_sequences([long], 6, pad_id=0, overflow="error")
  untrained = (np.arange(4), np.zeros(4))
  assert pack_sequences([untrained, short], 6, pad_id=0).examples == ((1,),)
  with pytest.raises(ValueError, match="example 0: 4 ids but 3 loss-mask bits"):
    pack_sequences([(np.arange(4), np.ones(3))], 6, pad_id=0)


def test_batches():
  packed = pack_sequences([example(6, 10 * k, 1) for k in range(5)], 8, pad_id=0)
  batches = list(packed.batches(2))
  assert len(batches) == 2 and batches[0].segment_ids_BT.shape == (2, 8)
  assert len(list(packed.batches(2, drop_remainder=False))) == 3


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(2, 20), st.integers(0, 19)), min_size=1, max_size=30), st.integers(8, 40))
def test_every_trained_target_survives_packing(specs, seq_len):
  examples = [example(n, 1000 * k, min(p, n - 1)) for k, (n, p) in enumerate(specs)]
  packed = pack_sequences(examples, seq_len, overflow="drop", pad_id=-1)
  # Each (input, target) pair trained in the packed rows is trained in exactly one source example.
  trained = sorted(
    (int(i), int(t))
    for i, t, m in zip(
      packed.tokens.input_ids_BT.ravel(), packed.tokens.targets_BT.ravel(), packed.tokens.loss_mask_BT.ravel()
    )
    if m
  )
  expected = sorted(
    (int(ids[j]), int(ids[j + 1]))
    for ids, mask in examples
    if ids.size <= seq_len
    for j in range(ids.size - 1)
    if mask[j + 1]
  )
  assert trained == expected
  seg, pos = packed.tokens.segment_ids_BT, packed.tokens.positions_BT
  assert ((seg == 0) <= (pos == 0)).all()  # padding has position 0
  starts = np.diff(np.pad(seg, ((0, 0), (1, 0))), axis=1) != 0
  assert (pos[starts & (seg > 0)] == 0).all()  # positions restart with each segment
