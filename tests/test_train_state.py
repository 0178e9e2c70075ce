"""Train state: optimizer pieces, SFT loss normalisation and accumulation, LoRA, sharding, reference model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from retool_jax import sharding as sharding_lib
from retool_jax.data.packing import pack_sequences
from retool_jax.models.logprobs import naive_logprobs
from retool_jax.models.qwen3 import Qwen3, Qwen3Config
from retool_jax.train import lora as lora_lib
from retool_jax.train import sft
from retool_jax.train import state as state_lib

CFG = Qwen3Config(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
  attention_bias=True,
  scan_layers=True,
)
OPTIM = dict(schedule="constant", learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip_norm=1.0)


def _batch(n_rows=4, seq_len=24, seed=0):
  examples = sft.synthetic_examples(3 * n_rows, CFG.vocab_size, seed, min_len=5, max_len=14)
  rows = pack_sequences(examples, seq_len, pad_id=0)
  return jax.tree.map(jnp.asarray, next(rows.batches(n_rows)))


def _state(mesh=None, lora=None, optim=OPTIM):
  tx, schedule = state_lib.make_optimizer(optim, 10)
  mesh = mesh or sharding_lib.make_mesh(devices=jax.devices()[:1])
  model = sharding_lib.create_sharded(lambda: Qwen3(CFG, rngs=nnx.Rngs(0)), mesh)
  state, shardings = state_lib.create_train_state(
    model, tx, jax.random.key(1), mesh, lora_config=lora, lora_rng=jax.random.key(2)
  )
  return state, shardings, schedule, mesh


def _step(schedule, accum=1):
  return jax.jit(sft.make_train_step(schedule, grad_accum_steps=accum, chunk_size=8))


@pytest.fixture(scope="module")
def base():
  """A one-device state and its compiled step, shared by the tests that do not change them."""
  state, shardings, schedule, mesh = _state()
  return state, shardings, _step(schedule)


def test_decay_mask_spares_norms_and_biases():
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Qwen3(CFG, rngs=nnx.Rngs(0))), nnx.Param))
  flat = {
    "/".join(str(k.key) for k in path): v
    for path, v in jax.tree_util.tree_flatten_with_path(state_lib.decay_mask(params))[0]
  }
  assert not flat["norm/weight"] and not flat["dense_layers/self_attn/q_norm/weight"]
  assert not flat["dense_layers/input_layernorm/weight"] and not flat["dense_layers/self_attn/q_bias"]
  assert flat["dense_layers/self_attn/q_proj"] and flat["dense_layers/mlp/down_proj"] and flat["embed_tokens"]


def test_schedules():
  warm_cos = state_lib.make_schedule(
    dict(schedule="warmup_cosine", learning_rate=1.0, warmup_steps=10, decay_steps=110, end_lr_factor=0.1), 1000
  )
  assert float(warm_cos(0)) == 0.0 and float(warm_cos(5)) == pytest.approx(0.5)
  assert float(warm_cos(10)) == pytest.approx(1.0) and float(warm_cos(60)) == pytest.approx(0.55)
  assert float(warm_cos(110)) == pytest.approx(0.1)
  lin = state_lib.make_schedule(dict(schedule="warmup_linear", learning_rate=2.0, warmup_steps=0), 100)
  assert float(lin(50)) == pytest.approx(1.0) and float(lin(100)) == pytest.approx(0.0)
  const = state_lib.make_schedule(dict(schedule="constant", learning_rate=3.0, warmup_steps=4), 100)
  assert float(const(2)) == pytest.approx(1.5) and float(const(50)) == pytest.approx(3.0)
  with pytest.raises(ValueError, match="optim.schedule='cosine'"):
    state_lib.make_schedule(dict(schedule="cosine", learning_rate=1.0), 10)


def test_sft_loss_is_mean_nll_over_loss_tokens(base):
  state, _, step = base
  batch = _batch()
  model = state.model()
  logp = naive_logprobs(model(batch.input_ids_BT, batch.positions_BT, batch.segment_ids_BT), batch.targets_BT)
  mask = np.asarray(batch.loss_mask_BT) > 0
  expected = -np.asarray(logp)[mask].mean()
  _, metrics = step(state, batch)
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["loss_tokens"]) == mask.sum()


def test_gradient_accumulation_gives_the_same_update():
  # plain SGD, so the update is the gradient itself (Adam's first step is about sign(g) and hides its size)
  state = state_lib.TrainState.create(Qwen3(CFG, rngs=nnx.Rngs(0)), optax.sgd(1.0), jax.random.key(0))
  schedule = optax.constant_schedule(1.0)
  batch = _batch(n_rows=4)
  batch = dataclasses.replace(
    batch, loss_mask_BT=batch.loss_mask_BT.at[0, :6].set(0)
  )  # micro-batches with unequal loss-token counts
  one, m1 = _step(schedule, 1)(state, batch)
  two, m2 = _step(schedule, 2)(state, batch)
  assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
  assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert int(one.step) == int(two.step) == 1
  counts = np.asarray(batch.loss_mask_BT).reshape(2, 2, -1).swapaxes(0, 1).sum(axis=(1, 2))
  assert counts[0] != counts[1]


def test_lora_trains_only_adapters_and_merges():
  lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q", "o", "down"))
  state, _, schedule, _ = _state(lora=lcfg)
  assert set(state.lora) == {
    "dense_layers/self_attn/q_proj",
    "dense_layers/self_attn/o_proj",
    "dense_layers/mlp/down_proj",
  }
  assert state.lora["dense_layers/self_attn/o_proj"]["a"].shape == (2, 32, 4)  # [layers, heads*head_dim, rank]
  batch = _batch()
  base = jax.tree.map(np.asarray, state.params)
  # B starts at zero: the adapted model is the base model
  np.testing.assert_array_equal(
    state.model()(batch.input_ids_BT), nnx.merge(state.graphdef, base)(batch.input_ids_BT)
  )
  step = _step(schedule)
  for _ in range(3):
    state, _ = step(state, batch)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), base)  # frozen
  assert float(jnp.abs(state.lora["dense_layers/mlp/down_proj"]["b"]).max()) > 0
  merged = lora_lib.merge_lora(nnx.merge(state.graphdef, state.params), state.lora, lcfg)
  np.testing.assert_allclose(merged(batch.input_ids_BT), state.model()(batch.input_ids_BT), rtol=1e-5, atol=1e-5)
  assert not np.allclose(merged(batch.input_ids_BT), nnx.merge(state.graphdef, base)(batch.input_ids_BT))
  with pytest.raises(ValueError, match="unknown"):
    lora_lib.LoraConfig(targets=("qkv",))


@pytest.mark.slow  # two meshes, two compilations: ~35 s on two busy cores
def test_sharded_training_matches_one_device():
  assert jax.device_count() >= 8
  batch = _batch(n_rows=8)
  results = []
  for mesh in (sharding_lib.make_mesh(devices=jax.devices()[:1]), sharding_lib.make_mesh(fsdp=4, tensor=2)):
    state, shardings, schedule, _ = _state(mesh)
    with jax.set_mesh(mesh):
      step = jax.jit(
        sft.make_train_step(schedule, grad_accum_steps=2, chunk_size=8),
        in_shardings=(shardings, sharding_lib.data_sharding(mesh)),
        out_shardings=(shardings, None),
      )
      gbatch = jax.device_put(batch, sharding_lib.data_sharding(mesh))
      for _ in range(2):
        state, metrics = step(state, gbatch)
    results.append((jax.tree.map(np.asarray, state.params), float(metrics["loss"])))
    if mesh.size == 8:
      q = state.params["dense_layers"]["self_attn"]["q_proj"]
      mu = state.opt_state[1][0].mu["dense_layers"]["self_attn"]["q_proj"]
      assert q.sharding.spec == mu.sharding.spec and q.sharding.spec != jax.P()
  (p1, l1), (p8, l8) = results
  assert l1 == pytest.approx(l8, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), p1, p8)


def test_reference_model_skipped_at_zero_and_offloaded(base):
  state, shardings, step = base
  assert state_lib.make_reference(0.0, state, shardings) is None
  batch = _batch()
  on_device = state_lib.make_reference(0.1, state, shardings)
  parked = state_lib.make_reference(0.1, state, shardings, offload=True)
  leaf = jax.tree.leaves(parked.params)[0]
  assert isinstance(leaf, np.ndarray) or leaf.sharding.memory_kind == "pinned_host"
  args = (batch.input_ids_BT, batch.targets_BT)
  kw = dict(positions=batch.positions_BT, segment_ids=batch.segment_ids_BT)
  a, b = on_device.logprobs(*args, **kw), parked.logprobs(*args, **kw)
  np.testing.assert_array_equal(a.logprobs_BT, b.logprobs_BT)
  state, _ = step(state, batch)  # the policy moves on; the reference does not
  c = on_device.logprobs(*args, **kw)
  np.testing.assert_array_equal(a.logprobs_BT, c.logprobs_BT)
