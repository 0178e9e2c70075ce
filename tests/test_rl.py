"""The RL trainer on the embedded engine with a tiny model: configs, batching, and real policy updates."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retool_jax.demo_task.task import make_problems, prompt_ids
from retool_jax.demo_task.tokenizer import build_tokenizer
from retool_jax.models.qwen3 import Qwen3, Qwen3Config
from retool_jax.rewards.result import RewardResult
from retool_jax.rollout import JaxEngine, MultiTurnConfig
from retool_jax.rollout.multiturn import Rollout, TurnStats
from retool_jax.rollout.scoring import rollout_metrics
from retool_jax.train import state as state_lib
from retool_jax.train.rl import RLTrainer
from retool_jax.train.rl_batch import bucket_length, minibatch_indices, pack_rollouts
from retool_jax.train.rl_config import RLConfig


def test_config_checks_fields():
  c = RLConfig.from_config(
    {
      "algorithm": "rloo",
      "group_size": 4,
      "loss": {"clip_high": 0.3},
      "overlong": {"max_len": 64, "cache_len": 16},
    }
  )
  assert c.loss.clip_high == 0.3 and c.overlong.cache_len == 16 and c.batch_size == 128
  with pytest.raises(ValueError, match=r"rl: unknown field\(s\) \['lr'\]"):
    RLConfig.from_config({"lr": 1.0})
  with pytest.raises(ValueError, match=r"rl.loss: unknown field\(s\) \['clip'\]"):
    RLConfig.from_config({"loss": {"clip": 0.2}})
  with pytest.raises(ValueError, match="rl.algorithm"):
    RLConfig(algorithm="reinforce")
  with pytest.raises(ValueError, match="num_minibatches"):
    RLConfig(num_prompts=3, group_size=1, num_minibatches=2)
  with pytest.raises(ValueError, match="kl_reward_coef"):
    RLConfig(kl_reward_coef=0.1)


def _rollout(ids, mask, logprobs, n_prompt=2, status="completed", calls=0):
  return Rollout(
    list(ids),
    list(mask),
    list(logprobs),
    n_prompt,
    status,
    "eos",
    [TurnStats(sum(mask), "stop", tool_calls=calls, tool_errors=min(calls, 1))],
    "",
  )


def test_pack_rollouts_shifts_and_pads():
  a = _rollout([5, 6, 7, 8], [0, 0, 1, 1], [0, 0, -0.5, -0.25])
  b = _rollout([5, 6, 9], [0, 0, 1], [0, 0, -1.0])
  batch = pack_rollouts([a, b], pad_id=0, length_multiple=4)
  assert batch.shape == (2, 4)
  np.testing.assert_array_equal(
    batch.tokens.input_ids_BT, [[5, 6, 7, 8], [5, 6, 9, 0]]
  )  # last ids predict nothing
  np.testing.assert_array_equal(batch.tokens.targets_BT, [[6, 7, 8, 0], [6, 9, 0, 0]])
  np.testing.assert_array_equal(batch.tokens.loss_mask_BT, [[0, 1, 1, 0], [0, 1, 0, 0]])
  np.testing.assert_array_equal(batch.tokens.segment_ids_BT, [[1, 1, 1, 0], [1, 1, 0, 0]])
  np.testing.assert_array_equal(batch.tokens.positions_BT, [[0, 1, 2, 3], [0, 1, 2, 3]])
  np.testing.assert_allclose(batch.rollout_logp_BT, [[0, -0.5, -0.25, 0], [0, -1.0, 0, 0]])
  assert [bucket_length(n, 64) for n in (1, 64, 65, 129, 300)] == [64, 64, 128, 192, 320]
  rows = minibatch_indices(8, 2, np.random.default_rng(0))
  assert sorted(np.concatenate(rows).tolist()) == list(range(8))
  with pytest.raises(ValueError, match="num_minibatches=3"):
    minibatch_indices(8, 3, None)
  with pytest.raises(ValueError, match="differ in length"):
    pack_rollouts([_rollout([1, 2, 3], [0, 1], [0, 0, 0])], pad_id=0)


def test_rollout_metrics_keep_accuracy_apart_from_reward():
  ro = [
    _rollout([1, 2, 3], [0, 0, 1], [0, 0, 0], calls=2),
    _rollout([1, 2, 3, 4], [0, 0, 1, 1], [0] * 4, status="truncated"),
  ]
  res = [RewardResult(-0.8, False, "1", True), RewardResult(1.0, True, "2", False)]
  m = rollout_metrics(ro, res)
  assert m["accuracy"] == 0.5 and m["reward_mean"] == pytest.approx(0.1) and m["format_ok"] == 0.5
  assert m["tool_calls_per_traj"] == 1.0 and m["tool_use_rate"] == 0.5 and m["tool_error_rate"] == 0.5
  assert m["truncation_rate"] == 0.5 and m["response_length"] == 1.5


class SevensReward:
  """Reward: the fraction of generated characters that are '7' (a signal a tiny random policy can climb)."""

  def __call__(self, response, ground_truth, info=None):
    text = response.replace("<|im_end|>", "")
    frac = text.count("7") / max(len(text), 1)
    return RewardResult(frac, frac > 0.5, None, True)


@pytest.fixture(scope="module")
def tiny():
  tokenizer = build_tokenizer()
  cfg = Qwen3Config(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    tie_word_embeddings=True,
    max_position_embeddings=128,
    bos_token_id=None,
    eos_token_id=tokenizer.eos_token_id,
  )
  return tokenizer, cfg


def _trainer(tiny, rl: RLConfig, *, lr=3e-2, reference=False):
  tokenizer, cfg = tiny
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  tx, _ = state_lib.make_optimizer({"learning_rate": lr, "schedule": "constant", "grad_clip_norm": 1.0}, 100)
  state = state_lib.TrainState.create(model, tx, jax.random.key(0))
  engine = JaxEngine(
    model,
    tokenizer=tokenizer,
    max_length=96,
    max_batch_size=16,
    min_batch_bucket=16,
    min_prompt_bucket=64,
    min_new_bucket=16,
    seed=0,
  )
  problems = make_problems(64, seed=0)
  items = [{"prompt": prompt_ids(tokenizer, p), "answer": p.answer} for p in problems]
  batches = iter([items[i : i + 3] for i in range(0, len(items), 3)])  # regrouped to num_prompts
  ref = state_lib.make_reference(1.0, state, jax.tree.map(lambda _: None, state)) if reference else None
  mt = MultiTurnConfig(
    max_context=80, max_turns=2, max_new_tokens=12, call_formats=("code",), enable_thinking=False
  )
  return RLTrainer(
    rl,
    state,
    engine=engine,
    tokenizer=tokenizer,
    tools=None,
    multiturn=mt,
    reward_fn=SevensReward(),
    prompts=batches,
    reference=ref,
  )


def test_grpo_steps_update_policy_and_sync_engine(tiny):
  rl = RLConfig(
    num_prompts=4,
    group_size=4,
    num_minibatches=2,
    num_epochs=2,
    length_multiple=32,
    loss=dataclasses.replace(RLConfig().loss, tis_cap=2.0, entropy_coef=0.01),
  )
  trainer = _trainer(tiny, rl)
  before = jax.tree.map(np.asarray, trainer.state.params)
  sevens_before = _log_p_seven(trainer, tiny[0])
  first = trainer.step()
  rewards = [first["reward_mean"]]
  for _ in range(5):
    last = trainer.step()
    rewards.append(last["reward_mean"])
  trainer.close()
  assert int(trainer.state.step) == 6 * 4 and trainer.engine.weight_version == 6
  after = trainer.state.params
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
  for key in (
    "reward_mean",
    "reward_std",
    "accuracy",
    "tool_calls_per_traj",
    "tool_error_rate",
    "response_length",
    "truncation_rate",
    "pg_clipfrac",
    "entropy",
    "grad_norm",
    "perf/tokens_per_s",
    "time/rollout",
    "time/reference",
    "time/train",
    "time/sync",
    "rollout_kl",
    "tis_weight_mean",
  ):
    assert key in last and np.isfinite(last[key]), key
  # the trainer's recomputed log-probs match the engine's (same weights, same temperature)
  assert first["rollout_kl"] < 1e-4
  # a real reward signal, real updates: the policy learns to write sevens. The policy's own probability of '7'
  # is the low-noise measure; the sampled reward must rise too.
  sevens_after = _log_p_seven(trainer, tiny[0])
  print(f"log p('7') {sevens_before:.3f} -> {sevens_after:.3f}; rewards {np.round(rewards, 3).tolist()}")
  assert sevens_after > sevens_before + 1.0
  assert np.mean(rewards[-3:]) > rewards[0] + 0.03


def _log_p_seven(trainer, tokenizer) -> float:
  """Mean log-probability the policy gives '7' as the first response token of the first 8 training prompts."""
  model = trainer.state.model()
  seven = tokenizer.convert_tokens_to_ids("7")
  prompts = [prompt_ids(tokenizer, p) for p in make_problems(8, seed=0)]
  return float(np.mean([jax.nn.log_softmax(model(jnp.asarray([p]))[0, -1])[seven] for p in prompts]))


def test_rloo_with_kl_loss_and_dynamic_sampling(tiny):
  rl = RLConfig(
    algorithm="rloo",
    num_prompts=2,
    group_size=4,
    dynamic_sampling=True,
    max_sampling_rounds=3,
    length_multiple=32,
    loss=dataclasses.replace(RLConfig().loss, kl_coef=0.1, kl_estimator="k2"),
  )
  with pytest.raises(ValueError, match="no reference"):
    _trainer(tiny, rl)
  trainer = _trainer(tiny, rl, reference=True)
  m = trainer.step()
  trainer.close()
  assert m["kl"] == pytest.approx(0.0, abs=1e-6)  # the first update starts from the reference
  assert 1 <= m["sampling_rounds"] <= 3 and 0 < m["kept_fraction"] <= 1
  assert m["batch_size"] <= 8
