"""`retool_jax.train.dpo.train` from a config: a tiny saved policy, preference pairs on disk, a few real steps;
the pairs are read through the shared input pipeline (host slices, epochs, a checkpointed position)."""

import json
import math
import shutil

import numpy as np
from flax import nnx

from retool_jax.checkpoint import layout, save
from retool_jax.demo_task.tokenizer import build_tokenizer
from retool_jax.models.qwen3 import Qwen3
from retool_jax.train import check_config
from retool_jax.train.checkpointing import Checkpointer
from retool_jax.train.dpo import default_config, num_updates, pack_pairs, pair_pipeline, split_sides, train
from retool_jax.train.metrics import read_metrics, without_wall_clock
from tiny_qwen3 import tiny_config


def test_dpo_train_prefers_chosen_and_writes_checkpoint_and_metrics(tmp_path):
  cfg = tiny_config()
  save(tmp_path / "policy", Qwen3(cfg, rngs=nnx.Rngs(0)), cfg)
  build_tokenizer().save_pretrained(tmp_path / "tokenizer")  # a small character-level chat tokenizer
  pairs = tmp_path / "pairs.jsonl"
  with open(pairs, "w") as f:
    for a in range(8):
      row = {
        "prompt": f"What is {a} + {a + 3}?",
        "chosen": f"Using the interpreter: {a} + {a + 3} = \\boxed{{{2 * a + 3}}}",
        "rejected": "I cannot compute that.",
      }
      f.write(json.dumps(row) + "\n")

  c = default_config()
  c.workdir = str(tmp_path / "run")
  c.model.checkpoint = str(tmp_path / "policy")
  c.model.dtype = "float32"
  c.data.path = str(pairs)
  c.data.tokenizer = str(tmp_path / "tokenizer")
  c.data.enable_thinking = False
  c.batch_size = 4
  c.num_epochs = 5
  c.optim.learning_rate = 5e-3
  c.checkpoint.async_save = False
  c.log.tensorboard = False
  check_config(c)
  last = train(c)

  records = read_metrics(tmp_path / "run" / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, 11))  # 8 pairs / 4 per batch x 5 epochs
  first = records[0]
  assert math.isclose(first["loss"], math.log(2), rel_tol=1e-3)  # the first update starts at the reference
  assert last["loss"] == records[-1]["loss"] and np.isfinite(last["loss"])
  assert last["loss"] < 0.5 * first["loss"]
  assert last["reward_accuracy"] == 1.0 and last["reward_margin"] > first["reward_margin"]
  assert Checkpointer(tmp_path / "run" / "checkpoints", save_every=1).latest_step() == 10  # the final state
  run = tmp_path / "run"  # the run folder every trainer writes
  assert json.loads((run / "config.json").read_text())["batch_size"] == 4
  assert json.loads((run / "summary.json").read_text()) == last and last["step"] == 10
  assert json.loads((run / "prompt_contract.json").read_text())["enable_thinking"] is False
  assert all(r["perf/step_time_s"] > 0 for r in records)
  assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn at the end of the loop


def _hosts(n, count, **kwargs):
  return [pair_pipeline(list(range(n)), process_index=h, process_count=count, **kwargs) for h in range(count)]


def test_hosts_read_disjoint_slices_of_whole_batches_covering_every_epoch():
  n, g, epochs = 10, 4, 3
  steps = num_updates(n, g, epochs)
  assert steps == 7  # 30 pair visits in whole batches of 4: the last 2 visits are never read
  pipes = _hosts(n, 2, batch_size=g, num_epochs=epochs, seed=5)
  single = pair_pipeline(list(range(n)), batch_size=g, num_epochs=epochs, seed=5, process_index=0, process_count=1)
  visits = []  # (epoch, pair) in global order
  for _ in range(steps):
    a, b = next(pipes[0]), next(pipes[1])
    assert len(a) == len(b) == g // 2 and a.mask.all() and b.mask.all()  # whole batches, a half each
    assert a.examples == a.indices.tolist()  # the pairs themselves, selected by index
    assert not set(zip(a.epoch.tolist(), a.indices.tolist())) & set(zip(b.epoch.tolist(), b.indices.tolist()))
    whole = next(single)
    assert sorted(a.indices.tolist() + b.indices.tolist()) == sorted(whole.indices.tolist())  # same global batch
    visits += [(int(e), int(i)) for batch in (a, b) for e, i in zip(batch.epoch, batch.indices)]
  for epoch in (0, 1):
    assert sorted(i for e, i in visits if e == epoch) == list(range(n))  # every pair once per epoch
  assert len({i for e, i in visits if e == 2}) == 8  # the third epoch's first 8 pairs, none twice
  assert [i for e, i in visits if e == 0] != [i for e, i in visits if e == 1]  # reshuffled per epoch


def test_pipeline_resumes_at_its_saved_position():
  n, g, epochs = 10, 4, 3
  straight = _hosts(n, 2, batch_size=g, num_epochs=epochs, seed=1)
  rows = [[next(p).indices.tolist() for p in straight] for _ in range(num_updates(n, g, epochs))]
  for k in (1, 2, 5):
    first = _hosts(n, 2, batch_size=g, num_epochs=epochs, seed=1)
    for _ in range(k):
      [next(p) for p in first]
    saved = first[0].state()
    assert saved == first[1].state()  # one position for all hosts
    resumed = _hosts(n, 2, batch_size=g, num_epochs=epochs, seed=1)
    for p in resumed:
      p.restore(saved)
    assert [[next(p).indices.tolist() for p in resumed] for _ in rows[k:]] == rows[k:]


def test_split_sides_keeps_each_pair_in_one_row():
  pairs = [((np.arange(2 + i), np.ones(2 + i)), (np.arange(5 + i), np.ones(5 + i))) for i in range(3)]
  packed = pack_pairs(pairs, pad_id=0, length_multiple=4)
  sides = split_sides(packed)
  assert sides["chosen"].segment_ids_BT.sum(axis=1).tolist() == [1, 2, 3]
  assert sides["rejected"].segment_ids_BT.sum(axis=1).tolist() == [4, 5, 6]
  fixed = pack_pairs(pairs, pad_id=0, length=16)  # a length every host agrees on
  assert fixed.input_ids_BT.shape == (6, 16)
  np.testing.assert_array_equal(fixed.input_ids_BT[:, :8], packed.input_ids_BT)


def test_dpo_resumes_exactly_with_float32_masters_and_lora(tmp_path):
  """LoRA, an on-the-fly reference, bf16 compute on float32 master weights; a run restarted from a mid-epoch
  checkpoint (later steps lost, their metric lines left behind as a killed run leaves them) continues at the
  saved pipeline position and logs what the uninterrupted run logged."""
  cfg = tiny_config()
  save(tmp_path / "policy", Qwen3(cfg, rngs=nnx.Rngs(0)), cfg)
  build_tokenizer().save_pretrained(tmp_path / "tokenizer")
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text(
    "".join(
      json.dumps({"prompt": f"{a} + 1?", "chosen": f"\\boxed{{{a + 1}}}", "rejected": "no idea"}) + "\n"
      for a in range(10)
    )
  )
  c = default_config()
  c.workdir = str(tmp_path / "straight")
  c.model.checkpoint = str(tmp_path / "policy")
  c.data.path = str(pairs)
  c.data.tokenizer = str(tmp_path / "tokenizer")
  c.data.enable_thinking = False
  c.batch_size = 4
  c.num_epochs = 2
  c.lora.rank, c.lora.targets = 2, "q,v,down"
  c.reference.precompute = False  # scored on the fly by the frozen base
  c.optim.learning_rate = 1e-2
  c.checkpoint.every_steps, c.checkpoint.keep, c.checkpoint.async_save = 2, 10, False
  c.log.tensorboard = c.log.progress = False
  check_config(c)
  train(c)
  expected = read_metrics(tmp_path / "straight")
  assert [r["step"] for r in expected] == list(range(1, 6))  # 10 pairs x 2 epochs in whole batches of 4
  assert math.isclose(expected[0]["loss"], math.log(2), rel_tol=1e-2)  # the policy starts as its reference
  assert expected[-1]["loss"] < expected[0]["loss"]  # the adapters learn
  ckpts = tmp_path / "straight" / "checkpoints"
  stored = layout.stored_params(layout.resolve(ckpts))
  assert {str(m.dtype) for m in stored.values()} == {"float32"}  # master weights, though compute is bf16
  saved = Checkpointer(ckpts, save_every=2)
  position = {step: saved.record(step)["data"] for step in (2, 5)}
  saved.close()
  assert position[2] == {"seed": 0, "epoch": 0, "position": 8, "num_examples": 10}  # mid-epoch
  assert position[5] == {"seed": 0, "epoch": 2, "position": 0, "num_examples": 10}

  shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
  for step in (4, 5):
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(step))
  c.workdir = str(tmp_path / "resumed")
  train(c)  # step 3 reads pairs 8-9 of epoch 0 and the first two of epoch 1
  got = read_metrics(tmp_path / "resumed")
  assert [without_wall_clock(r) for r in got] == [without_wall_clock(r) for r in expected]
