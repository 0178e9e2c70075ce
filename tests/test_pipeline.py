"""Input pipeline: shuffling by seed and epoch, simulated multi-host sharding, padding, resumption."""

import json
import os
import subprocess
import sys
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retool_jax.data import Example, load_gsm8k, pack_sequences, read_rows
from retool_jax.data.pipeline import InputPipeline, global_batch, grain_seed, permutation

FIXTURES = Path(
  os.environ.get("RETOOL_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures")
)


def hosts(source, count, **kwargs):
  return [InputPipeline(source, process_index=h, process_count=count, **kwargs) for h in range(count)]


def global_steps(pipes, steps):
  """Per global step: the (index, epoch, valid) rows of every host, host by host."""
  out = []
  for _ in range(steps):
    batches = [next(p) for p in pipes]
    out.append([(int(i), int(e), bool(m)) for b in batches for i, e, m in zip(b.indices, b.epoch, b.mask)])
  return out


def seen_per_epoch(steps):
  seen = {}
  for rows in steps:
    for index, epoch, valid in rows:
      if valid:
        seen.setdefault(epoch, []).append(index)
  return seen


@pytest.mark.parametrize("remainder", ["pad", "carry"])
def test_four_hosts_cover_every_example_once_per_epoch(remainder):
  n, g = 103, 8  # 103 = 12 * 8 + 7
  pipes = hosts(list(range(n)), 4, global_batch_size=g, seed=3, remainder=remainder)
  assert all(p.batch_size == 2 for p in pipes)
  steps = global_steps(pipes, 3 * 13)
  seen = seen_per_epoch(steps)
  for epoch in (0, 1, 2):
    assert sorted(seen[epoch]) == list(range(n)), epoch
  assert seen[0] != seen[1]  # reshuffled every epoch
  padding = sum(not valid for rows in steps for _, _, valid in rows)
  if remainder == "pad":
    # 13 batches per epoch; the 13th has 7 real rows and 1 padding row; epochs start on a fresh batch.
    assert padding == 3 and [len(seen[e]) for e in (0, 1, 2)] == [n, n, n]
    assert {e for _, e, _ in steps[12]} == {0} and {e for _, e, _ in steps[13]} == {1}
    assert pipes[0].state() == {"seed": 3, "epoch": 3, "position": 0, "num_examples": n}
  else:
    # 39 * 8 = 312 = 3 * 103 + 3: no padding; the epoch-0 tail and the epoch-1 head share step 12.
    assert padding == 0 and {e for _, e, _ in steps[12]} == {0, 1}
    assert pipes[0].state() == {"seed": 3, "epoch": 3, "position": 3, "num_examples": n}
  # Within a global step no two hosts hold the same example.
  for rows in steps:
    real = [(i, e) for i, e, valid in rows if valid]
    assert len(set(real)) == len(real)


@settings(max_examples=40, deadline=None)
@given(
  n=st.integers(1, 60),
  per_host=st.integers(1, 5),
  count=st.sampled_from([1, 2, 3, 4]),
  remainder=st.sampled_from(["pad", "carry"]),
  seed=st.integers(0, 2**31),
)
def test_sharding_property(n, per_host, count, remainder, seed):
  g = per_host * count
  pipes = hosts(list(range(n)), count, global_batch_size=g, seed=seed, remainder=remainder, num_epochs=2)
  steps = []
  while True:
    try:
      batches = [next(p) for p in pipes]
    except StopIteration:
      break
    assert all(len(b) == per_host for b in batches)
    steps.append([(int(i), int(e), bool(m)) for b in batches for i, e, m in zip(b.indices, b.epoch, b.mask)])
  seen = seen_per_epoch(steps)
  assert sorted(seen) == [0, 1] and all(sorted(seen[e]) == list(range(n)) for e in (0, 1))
  # Padding only where the remainder requires it.
  padding = sum(not v for rows in steps for _, _, v in rows)
  expected = 2 * (-(-n // g) * g - n) if remainder == "pad" else -(-2 * n // g) * g - 2 * n
  assert padding == expected and len(steps) == (2 * -(-n // g) if remainder == "pad" else -(-2 * n // g))


def test_order_depends_only_on_seed_and_epoch():
  a = InputPipeline(list(range(50)), global_batch_size=10, seed=7, process_index=0, process_count=1)
  b = InputPipeline(list(range(50)), global_batch_size=5, seed=7, process_index=0, process_count=1)
  c = InputPipeline(list(range(50)), global_batch_size=10, seed=8, process_index=0, process_count=1)
  first = np.concatenate([next(a).indices for _ in range(5)])
  assert first.tolist() == np.concatenate([next(b).indices for _ in range(10)]).tolist()
  assert first.tolist() == permutation(7, 0, 50).tolist()
  assert first.tolist() != np.concatenate([next(c).indices for _ in range(5)]).tolist()
  assert sorted(first.tolist()) == list(range(50))
  plain = InputPipeline(list("abcdef"), global_batch_size=4, shuffle=False, process_index=0, process_count=1)
  first, second = next(plain), next(plain)
  assert first.examples == list("abcd") and second.examples == ["e", "f", "a", "b"]
  assert second.mask.tolist() == [True, True, False, False]


@pytest.mark.parametrize("remainder", ["pad", "carry"])
def test_resume_from_saved_position(remainder):
  n, g, count = 37, 8, 4
  reference = global_steps(hosts(list(range(n)), count, global_batch_size=g, seed=11, remainder=remainder), 25)
  first = hosts(list(range(n)), count, global_batch_size=g, seed=11, remainder=remainder)
  assert global_steps(first, 9) == reference[:9]
  saved = json.loads(json.dumps(first[0].state()))  # what goes into the checkpoint
  assert all(p.state() == saved for p in first)  # the same on every host
  # The seed comes from the saved state.
  resumed = hosts(list(range(n)), count, global_batch_size=g, seed=0, remainder=remainder)
  for p in resumed:
    p.restore(saved)
  assert global_steps(resumed, 16) == reference[9:]
  # A run resumed on 2 hosts instead of 4 continues the same global stream.
  half = hosts(list(range(n)), 2, global_batch_size=g, remainder=remainder)
  for p in half:
    p.restore(saved)
  for want, got in zip(reference[9:], global_steps(half, 16)):
    assert sorted(want) == sorted(got)


def test_state_round_trips_through_an_orbax_checkpoint(tmp_path):
  pipe = InputPipeline(list(range(30)), global_batch_size=4, seed=5, process_index=0, process_count=1)
  for _ in range(11):
    next(pipe)
  checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler())
  checkpointer.save(tmp_path / "data", args=ocp.args.JsonSave(pipe.state()))
  resumed = InputPipeline(list(range(30)), global_batch_size=4, process_index=0, process_count=1)
  resumed.restore(checkpointer.restore(tmp_path / "data", args=ocp.args.JsonRestore()))
  for _ in range(10):
    assert next(resumed).indices.tolist() == next(pipe).indices.tolist()


def test_built_on_grain_and_ordered_by_grains_shuffle():
  n, g, count = 23, 6, 3
  pipes = hosts(list(range(n)), count, global_batch_size=g, seed=4, remainder="carry")
  assert all(
    isinstance(p.dataset, grain.MapDataset) and isinstance(p.iterator, grain.DatasetIterator) for p in pipes
  )
  # The dataset is random access: its k-th element is the host's k-th batch.
  assert (
    pipes[1].dataset[5].indices.tolist() == [b.indices.tolist() for b in [next(pipes[1]) for _ in range(6)]][5]
  )
  # The global stream is grain's shuffle of the index range, epochs end to end, reseeded every epoch.
  shuffled = grain.MapDataset.range(n).shuffle(seed=grain_seed(4))
  expected = [shuffled[k] for k in range(3 * n)]
  steps = global_steps(hosts(list(range(n)), count, global_batch_size=g, seed=4, remainder="carry"), 3 * n // g)
  per_host = g // count
  # Host h holds global rows h, h + count, ...: put every step's rows back in global order.
  stream = [rows[(k % count) * per_host + k // count][0] for rows in steps for k in range(g)]
  assert stream == expected[: len(stream)] and len(stream) == 3 * n - 3 * n % g
  assert permutation(4, 1, n).tolist() == expected[n : 2 * n] != expected[:n]
  # Neighbouring seeds share no epoch (grain reseeds an epoch as seed + epoch; the seed is mixed first).
  assert permutation(7, 1, 50).tolist() != permutation(8, 0, 50).tolist()


def test_grain_iterator_state_round_trips_through_grains_orbax_handler(tmp_path):
  pipe = InputPipeline(list(range(30)), global_batch_size=4, seed=5, process_index=0, process_count=1)
  for _ in range(9):
    next(pipe)
  assert pipe.iterator.get_state() == {"next_index": 9}
  checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  checkpointer.save(tmp_path / "grain", args=grain.checkpoint.CheckpointSave(pipe.iterator))
  resumed = InputPipeline(list(range(30)), global_batch_size=4, seed=5, process_index=0, process_count=1)
  checkpointer.restore(tmp_path / "grain", args=grain.checkpoint.CheckpointRestore(resumed.iterator))
  assert resumed.state() == pipe.state() == {"seed": 5, "epoch": 1, "position": 4, "num_examples": 30}
  for _ in range(10):
    assert next(resumed).indices.tolist() == next(pipe).indices.tolist()


def test_grain_sources_and_read_ahead_threads():
  source = grain.MapDataset.source([{"x": i} for i in range(20)]).map(lambda r: {"x": r["x"], "y": 3 * r["x"]})
  threaded = InputPipeline(
    source,
    global_batch_size=4,
    seed=1,
    process_index=0,
    process_count=1,
    read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=3),
  )
  plain = InputPipeline(source, global_batch_size=4, seed=1, process_index=0, process_count=1)
  for _ in range(7):
    a, b = next(threaded), next(plain)
    assert a.indices.tolist() == b.indices.tolist() and a.examples["x"].tolist() == a.indices.tolist()
    np.testing.assert_array_equal(a.examples["y"], 3 * a.examples["x"])
  records = InputPipeline(
    grain.sources.RangeDataSource(10, 20, 1), global_batch_size=5, shuffle=False, process_index=0, process_count=1
  )
  assert next(records).examples == [10, 11, 12, 13, 14]


def test_restoring_a_position_from_another_batch_size_keeps_epochs_apart():
  # A state saved with a global batch of 2 (position 2) restored with one of 4: the epoch's last batch is
  # padded, and the next epoch starts on a fresh batch.
  pipe = InputPipeline(list(range(10)), global_batch_size=4, shuffle=False, process_index=0, process_count=1)
  pipe.restore({"seed": 0, "epoch": 0, "position": 2, "num_examples": 10})
  batches = [next(pipe) for _ in range(3)]
  assert [b.indices.tolist() for b in batches] == [[2, 3, 4, 5], [6, 7, 8, 9], [0, 1, 2, 3]]
  assert [b.epoch.tolist() for b in batches] == [[0] * 4, [0] * 4, [1] * 4] and all(b.mask.all() for b in batches)
  assert pipe.state() == {"seed": 0, "epoch": 1, "position": 4, "num_examples": 10}


def test_num_epochs_stops_and_pads_the_last_carry_batch():
  pipe = InputPipeline(
    list(range(10)), global_batch_size=4, remainder="carry", num_epochs=2, process_index=0, process_count=1
  )
  batches = list(pipe)
  assert len(batches) == 5 and [b.mask.sum() for b in batches] == [4, 4, 4, 4, 4]
  pipe = InputPipeline(
    list(range(10)), global_batch_size=4, remainder="carry", num_epochs=1, process_index=0, process_count=1
  )
  assert [b.mask.tolist() for b in pipe][-1] == [True, True, False, False]


def test_record_sources_and_transform():
  examples = load_gsm8k(FIXTURES / "gsm8k" / "test.jsonl", limit=40)
  pipe = InputPipeline(examples, global_batch_size=16, seed=1, process_index=1, process_count=2)
  batch = next(pipe)
  assert len(batch.examples) == 8 and all(isinstance(e, Example) for e in batch.examples)
  assert [e.metadata["index"] for e in batch.examples] == batch.indices.tolist()
  # A `datasets.Dataset` is read through its batched `__getitems__`; a transform maps each row.
  rows = read_rows(FIXTURES / "gsm8k" / "test.jsonl", limit=40)
  pipe = InputPipeline(
    rows,
    global_batch_size=16,
    seed=1,
    process_index=1,
    process_count=2,
    transform=lambda row: {"length": len(row["question"])},
  )
  lengths = next(pipe).examples["length"]
  assert lengths.dtype.kind == "i" and lengths.tolist() == [len(rows[int(i)]["question"]) for i in batch.indices]


def test_array_sources():
  packed = pack_sequences([(np.arange(k + 2), np.ones(k + 2)) for k in range(12)], seq_len=16, pad_id=0)
  pipe = InputPipeline(packed, global_batch_size=4, seed=2, process_index=0, process_count=2)
  batch = next(pipe)
  assert batch.examples["input_ids_BT"].shape == (2, 16)
  np.testing.assert_array_equal(batch.examples["segment_ids_BT"], packed.tokens.segment_ids_BT[batch.indices])
  columns = {"x": np.arange(10), "y": np.arange(10) * 2}
  batch = next(InputPipeline(columns, global_batch_size=5, process_index=0, process_count=1))
  np.testing.assert_array_equal(batch.examples["y"], 2 * batch.examples["x"])


def test_global_batch_on_a_mesh():
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  pipe = InputPipeline(
    {"ids": np.arange(64).reshape(16, 4)}, global_batch_size=16, process_index=0, process_count=1
  )
  batch = next(pipe)
  arrays = global_batch({**batch.examples, "mask": batch.mask}, sharding)
  assert arrays["ids"].shape == (16, 4) and arrays["ids"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(arrays["ids"]), batch.examples["ids"])
  assert np.asarray(arrays["mask"]).all()


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="multiple of process_count=4"):
    InputPipeline(list(range(10)), global_batch_size=6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r"process_index=4 is not in \[0, process_count=4\)"):
    InputPipeline(list(range(10)), global_batch_size=8, process_index=4, process_count=4)
  with pytest.raises(ValueError, match="remainder must be one of"):
    InputPipeline(list(range(10)), global_batch_size=8, remainder="drop", process_index=0, process_count=1)
  with pytest.raises(ValueError, match="source is empty"):
    InputPipeline([], global_batch_size=8, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="equal length"):
    InputPipeline({"a": np.zeros(3), "b": np.zeros(4)}, global_batch_size=1, process_index=0, process_count=1)
  pipe = InputPipeline(list(range(10)), global_batch_size=2, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="saved for 11 examples, but the source has 10"):
    pipe.restore({"seed": 0, "epoch": 0, "position": 0, "num_examples": 11})
  with pytest.raises(ValueError, match=r"missing \['position'\]"):
    pipe.restore({"seed": 0, "epoch": 0, "num_examples": 10})


def test_everything_but_the_builders_works_without_tensorflow_datasets():
  """`tensorflow-datasets` is an optional extra: loaders, pipeline and trainers import without it."""
  code = f"""
import sys
sys.modules["tensorflow_datasets"] = None  # as if the [tfds] extra were not installed
from retool_jax.data import InputPipeline, load_gsm8k
import retool_jax.train.sft
examples = load_gsm8k({str(FIXTURES / "gsm8k" / "test.jsonl")!r}, limit=8)
batch = next(InputPipeline(examples, global_batch_size=4, process_index=1, process_count=2))
print(len(batch.examples))
try:
  import retool_jax.data.tfds
except ImportError as e:
  print(e)
"""
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr
  lines = done.stdout.strip().splitlines()
  assert lines[0] == "2"
  assert lines[-1].startswith("retool_jax.data.tfds needs tensorflow-datasets; install it with: pip install")
