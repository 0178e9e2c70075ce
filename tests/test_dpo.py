"""DPO: pair packing, the loss at the reference, and real updates that prefer the chosen side."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retool_jax.models.qwen3 import Qwen3, Qwen3Config
from retool_jax.train import state as state_lib
from retool_jax.train.dpo import default_config, dpo_update, pack_pairs, precompute_reference


def _pairs(n, rng):
  """Prompt tokens (mask 0) then a chosen continuation of even tokens or a rejected one of odd tokens."""
  out = []
  for _ in range(n):
    prompt = rng.integers(1, 32, size=int(rng.integers(3, 6)))
    k = int(rng.integers(3, 7))
    chosen = rng.integers(0, 16, size=k) * 2
    rejected = rng.integers(0, 16, size=k + 1) * 2 + 1
    side = lambda resp: (
      np.concatenate([prompt, resp]).astype(np.int32),
      np.concatenate([np.zeros(len(prompt)), np.ones(len(resp))]).astype(np.int32),
    )
    out.append((side(chosen), side(rejected)))
  return out


def test_pack_pairs_stacks_chosen_over_rejected():
  (c_ids, c_mask), (r_ids, r_mask) = (
    (np.array([1, 2, 3]), np.array([0, 1, 1])),
    (np.array([1, 2, 4, 5]), np.array([0, 1, 1, 1])),
  )
  b = pack_pairs([((c_ids, c_mask), (r_ids, r_mask))], pad_id=0, length_multiple=4)
  np.testing.assert_array_equal(b.input_ids_BT, [[1, 2, 3, 0], [1, 2, 4, 5]])
  np.testing.assert_array_equal(b.targets_BT, [[2, 3, 0, 0], [2, 4, 5, 0]])
  np.testing.assert_array_equal(b.loss_mask_BT, [[1, 1, 0, 0], [1, 1, 1, 0]])
  np.testing.assert_array_equal(b.segment_ids_BT, [[1, 1, 0, 0], [1, 1, 1, 0]])
  with pytest.raises(ValueError, match="at least one pair"):
    pack_pairs([], pad_id=0)


def test_dpo_learns_the_preference():
  cfg = Qwen3Config(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=64,
  )
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  tx, _ = state_lib.make_optimizer({"learning_rate": 1e-2, "schedule": "constant"}, 100)
  state = state_lib.TrainState.create(model, tx, jax.random.key(0))
  rng = np.random.default_rng(0)
  batches = [pack_pairs(_pairs(8, rng), pad_id=0, length_multiple=16) for _ in range(4)]
  refs = precompute_reference(state, batches, chunk_size=16)
  metrics = []
  for epoch in range(4):
    for batch, (ref_c, ref_r) in zip(batches, refs):
      state, m = dpo_update(
        state,
        jax.tree.map(jnp.asarray, batch),
        ref_c,
        ref_r,
        beta=0.5,
        label_smoothing=0.1,
        chunk_size=16,
      )
      metrics.append(jax.device_get(m))
  # at the reference every margin is 0: loss = -(1-eps) log(1/2) - eps log(1/2) = log 2
  assert metrics[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
  assert metrics[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
  assert metrics[-1]["loss"] < 0.5 and metrics[-1]["reward_accuracy"] == 1.0
  assert metrics[-1]["rewards_chosen"] > metrics[-1]["rewards_rejected"]


def test_default_config_documents_the_fields():
  c = default_config()
  assert c.trainer == "dpo" and c.loss.beta == 0.1 and c.reference.precompute
