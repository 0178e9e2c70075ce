"""Training checkpoints: exact restore (state, RNG, data position), export through `checkpoint.load`, LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retool_jax import sharding as sharding_lib
from retool_jax.checkpoint import layout
from retool_jax.data.packing import pack_sequences
from retool_jax.data.pipeline import InputPipeline
from retool_jax.models.qwen3 import Qwen3, Qwen3Config
from retool_jax.train import lora as lora_lib
from retool_jax.train import sft
from retool_jax.train import state as state_lib
from retool_jax.train.checkpointing import Checkpointer

CFG = Qwen3Config(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
  tie_word_embeddings=True,
  scan_layers=True,
)
OPTIM = dict(schedule="warmup_cosine", learning_rate=1e-2, warmup_steps=2, weight_decay=0.1, grad_clip_norm=1.0)


def _setup(lora=None):
  mesh = sharding_lib.make_mesh(devices=jax.devices()[:1])
  tx, schedule = state_lib.make_optimizer(OPTIM, 8)
  model = sharding_lib.create_sharded(lambda: Qwen3(CFG, rngs=nnx.Rngs(0)), mesh)
  state, shardings = state_lib.create_train_state(
    model, tx, jax.random.key(7), mesh, lora_config=lora, lora_rng=jax.random.key(3)
  )
  rows = pack_sequences(sft.synthetic_examples(40, CFG.vocab_size, 0, min_len=5, max_len=14), 24, pad_id=0)
  pipeline = InputPipeline(rows, global_batch_size=4, seed=0, process_index=0, process_count=1)
  step = jax.jit(sft.make_train_step(schedule, grad_accum_steps=1, chunk_size=8), donate_argnums=0)
  return state, shardings, pipeline, step, mesh


def _run(state, pipeline, step, mesh, n, ckpt=None):
  out = []
  for _ in range(n):
    batch = sft._device_batch(next(pipeline), mesh)
    # the RNG is not used by SFT; advance it as a sampling trainer would, so its restore is checked too
    state = state.replace(rng=jax.random.split(state.rng)[0])
    state, metrics = step(state, batch)
    out.append({k: float(v) for k, v in metrics.items()})
    if ckpt is not None:
      ckpt.save(state, CFG, data_state=pipeline.state(), extra={"note": "x"})
  return state, out


def test_restore_continues_exactly(tmp_path):
  state, shardings, pipeline, step, mesh = _setup()
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=2, keep=2)
  final, metrics = _run(state, pipeline, step, mesh, 5, ckpt)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 4]

  fresh, _, pipeline2, _, _ = _setup()
  restored, record = ckpt.restore(fresh, shardings, 2)
  assert record["step"] == 2 and record["extra"] == {"note": "x"}
  pipeline2.restore(record["data"])
  again, metrics_again = _run(restored, pipeline2, step, mesh, 3)
  assert metrics_again == metrics[2:]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.params), jax.device_get(final.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.opt_state), jax.device_get(final.opt_state))
  np.testing.assert_array_equal(jax.random.key_data(again.rng), jax.random.key_data(final.rng))
  assert ckpt.save(final, CFG, force=True)  # off-schedule final save
  ckpt.close()

  # the step folder is a model checkpoint: `checkpoint.load` (and so `convert --to hf`) reads it
  model = layout.load(tmp_path / "ckpt")
  assert model.config == CFG
  np.testing.assert_array_equal(model.embed_tokens[...], jax.device_get(final.params)["embed_tokens"])


def test_lora_checkpoint_holds_merged_weights(tmp_path):
  lcfg = lora_lib.LoraConfig(rank=2, alpha=4.0, targets=("v", "up"))
  state, shardings, pipeline, step, mesh = _setup(lcfg)
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=3, keep=1, async_save=False)
  state, _ = _run(state, pipeline, step, mesh, 3, ckpt)
  ckpt.close()
  ids = jnp.arange(12, dtype=jnp.int32)[None]
  exported = layout.load(tmp_path / "ckpt")
  np.testing.assert_allclose(exported(ids), state.model()(ids), rtol=1e-5, atol=1e-6)
  fresh, *_ = _setup(lcfg)
  restored, _ = Checkpointer(tmp_path / "ckpt", save_every=3).restore(fresh, shardings)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.lora), jax.device_get(state.lora))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), jax.device_get(fresh.params))


def test_restore_without_checkpoint_names_directory(tmp_path):
  state, shardings, *_ = _setup()
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    Checkpointer(tmp_path / "empty", save_every=1).restore(state, shardings)
