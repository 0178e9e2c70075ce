"""Micro-batched RL passes (`rl.micro_batch_size`) give the one-pass results: log-probs, policy and critic updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retool_jax.models.qwen3 import Qwen3
from retool_jax.train import state as state_lib
from retool_jax.train.losses import PolicyLossConfig
from retool_jax.train.microbatch import merge_rows, split_rows
from retool_jax.train.rl import policy_logprobs, policy_update
from retool_jax.train.rl_config import RLConfig
from retool_jax.train.value_head import ValueModel, critic_update, critic_values
from tiny_qwen3 import tiny_config

B, T = 4, 12


def _batch(seed: int = 0) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  lengths = np.array([12, 7, 10, 5])
  attention = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  mask = attention * (np.arange(T)[None] >= 2)
  mask[3] = 0  # a row without policy tokens
  ids = rng.integers(0, 128, (B, T + 1)).astype(np.int32)
  return {
    "input_ids_BT": jnp.asarray(ids[:, :-1]),
    "targets_BT": jnp.asarray(ids[:, 1:]),
    "segment_ids_BT": jnp.asarray(attention),
    "positions_BT": jnp.asarray(np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))),
    "loss_mask_BT": jnp.asarray(mask, jnp.float32),
    "rollout_logp_BT": jnp.asarray(-rng.uniform(0.5, 3.0, (B, T)), jnp.float32),
    "old_logp_BT": jnp.asarray(-rng.uniform(0.5, 3.0, (B, T)), jnp.float32),
    "adv_BT": jnp.asarray(rng.normal(size=(B, T)), jnp.float32),
    "ref_logp_BT": jnp.asarray(-rng.uniform(0.5, 3.0, (B, T)), jnp.float32),
  }


def _state(module) -> state_lib.TrainState:
  """A fresh state over a copy of `module`'s weights (the updates donate theirs)."""
  tx, _ = state_lib.make_optimizer({"learning_rate": 1e-2, "schedule": "constant", "grad_clip_norm": 0.0}, 10)
  graphdef, variables = nnx.split(module)
  return state_lib.TrainState.create(nnx.merge(graphdef, jax.tree.map(jnp.copy, variables)), tx, jax.random.key(0))


def test_split_and_merge_rows_round_trip():
  x = jnp.arange(24).reshape(6, 4)
  parts = split_rows(x, 3)
  assert parts.shape == (3, 2, 4)
  np.testing.assert_array_equal(parts[0], x[::3])  # every third row: each part spread over the batch
  np.testing.assert_array_equal(merge_rows(parts), x)
  with pytest.raises(ValueError, match="does not split into 4"):
    split_rows(x, 4)


def test_rl_config_micro_batches():
  rl = RLConfig(num_prompts=4, group_size=4, num_minibatches=2, micro_batch_size=2)
  assert rl.minibatch_size == 8 and rl.micro_batches(8) == 4 and rl.micro_batches(16) == 8
  assert RLConfig().micro_batches(256) == 1
  with pytest.raises(ValueError, match="micro_batch_size=3 must divide the minibatch of 8 rows"):
    RLConfig(num_prompts=4, group_size=4, num_minibatches=2, micro_batch_size=3)


def test_policy_logprobs_micro_batched_match():
  state = _state(Qwen3(tiny_config(), rngs=nnx.Rngs(0)))
  batch = _batch()
  one, ent1 = policy_logprobs(state, batch, temperature=0.7, chunk=8, with_entropy=True)
  two, ent2 = policy_logprobs(state, batch, temperature=0.7, chunk=8, with_entropy=True, micro_batches=2)
  np.testing.assert_allclose(two, one, atol=1e-6)
  np.testing.assert_allclose(ent2, ent1, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_policy_update_micro_batched_is_the_same_update(aggregation):
  model = Qwen3(tiny_config(), rngs=nnx.Rngs(0))
  loss = PolicyLossConfig(aggregation=aggregation, kl_coef=0.1, entropy_coef=0.01, tis_cap=2.0)
  batch = _batch(1)
  s1, m1 = policy_update(_state(model), batch, loss_config=loss, temperature=1.0, chunk=8)
  s2, m2 = policy_update(_state(model), batch, loss_config=loss, temperature=1.0, chunk=8, micro_batches=2)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(b, a, atol=2e-6)
  for key in ("loss", "grad_norm", "pg_loss", "kl_loss"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-7)
  assert float(m2["ratio_max"]) == pytest.approx(float(m1["ratio_max"]), rel=1e-5)


def test_critic_micro_batched_values_and_update_match():
  value_model = ValueModel(Qwen3(tiny_config(), rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), init_scale=1.0)
  batch = _batch(2)
  values = critic_values(_state(value_model), batch)
  np.testing.assert_allclose(critic_values(_state(value_model), batch, micro_batches=2), values, atol=1e-6)
  rows = {k: batch[k] for k in ("input_ids_BT", "segment_ids_BT", "positions_BT", "loss_mask_BT")}
  rows.update(old_values_BT=values, returns_BT=values + jnp.asarray(np.random.default_rng(3).normal(size=(B, T))))
  clip = jnp.float32(0.2)
  s1, m1 = critic_update(_state(value_model), rows, clip)
  s2, m2 = critic_update(_state(value_model), rows, clip, micro_batches=2)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(b, a, atol=2e-6)
  np.testing.assert_allclose(m2["vf_loss"], m1["vf_loss"], rtol=1e-5)
  np.testing.assert_allclose(m2["vf_grad_norm"], m1["vf_grad_norm"], rtol=1e-5)
