"""`retool_jax.train.dpo.train` from a config: a tiny saved policy, preference pairs on disk, a few real steps."""

import json
import math

import numpy as np
from flax import nnx
from tiny_qwen3 import tiny_config

from retool_jax.checkpoint import save
from retool_jax.demo_task.tokenizer import build_tokenizer
from retool_jax.models.qwen3 import Qwen3
from retool_jax.train import check_config
from retool_jax.train.checkpointing import Checkpointer
from retool_jax.train.dpo import default_config, train
from retool_jax.train.metrics import read_metrics


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
