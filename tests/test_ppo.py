"""PPO's critic: the value model, GAE over the rollout's loss mask, KL in the reward, critic updates, a PPO step."""

import dataclasses
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retool_jax import sharding as sharding_lib
from retool_jax.demo_task.task import make_problems, prompt_ids
from retool_jax.demo_task.tokenizer import build_tokenizer
from retool_jax.models.qwen3 import Qwen3
from retool_jax.rewards.result import RewardResult
from retool_jax.rollout import JaxEngine, MultiTurnConfig
from retool_jax.rollout.multiturn import Rollout, TurnStats
from retool_jax.train import check_config
from retool_jax.train import state as state_lib
from retool_jax.train.rl import RLTrainer
from retool_jax.train.rl_batch import pack_rollouts
from retool_jax.train.rl_config import RLConfig
from retool_jax.train.rl_run import build_critic
from retool_jax.train.value_head import Critic, CriticConfig, ValueModel, create_critic_state
from tiny_qwen3 import tiny_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def tiny():
  tokenizer = build_tokenizer()
  return tokenizer, tiny_config(
    max_position_embeddings=128, bos_token_id=None, eos_token_id=tokenizer.eos_token_id
  )


def _critic(cfg, *, lr=1e-2, init_scale=0.0, config=CriticConfig()) -> Critic:
  value_model = ValueModel(Qwen3(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), init_scale=init_scale)
  tx, _ = state_lib.make_optimizer({"learning_rate": lr, "schedule": "constant", "grad_clip_norm": 1.0}, 100)
  return Critic(create_critic_state(value_model, tx, jax.random.key(1)), config)


def _rollout(ids, mask, n_prompt=2):
  return Rollout(list(ids), list(mask), [0.0] * len(ids), n_prompt, "completed", "eos", [TurnStats(1, "stop")], "")


def _batch():
  # row 0: prompt, 3 policy tokens, 2 tool-output tokens, 2 policy tokens; row 1: prompt, 2 policy tokens
  a = _rollout([1, 2, 10, 11, 12, 20, 21, 13, 14], [0, 0, 1, 1, 1, 0, 0, 1, 1])
  b = _rollout([1, 3, 15, 16], [0, 0, 1, 1])
  packed = pack_rollouts([a, b], pad_id=0, length_multiple=8)
  return {k: jnp.asarray(v) for k, v in packed.arrays().items()}


def test_value_model_shapes_and_zero_init(tiny):
  _, cfg = tiny
  batch = _batch()
  zero = _critic(cfg)
  v = zero.values(batch)
  assert v.shape == batch["input_ids_BT"].shape and v.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(v), 0.0)  # a zero-initialised head values every state at 0
  small = _critic(cfg, init_scale=0.1)
  v = np.asarray(small.values(batch))
  assert np.all(np.isfinite(v)) and np.std(v) > 0
  # causal: a position's value does not depend on later tokens
  changed = dict(batch, input_ids_BT=batch["input_ids_BT"].at[0, 5:].set(7))
  np.testing.assert_allclose(np.asarray(small.values(changed))[0, :5], v[0, :5], rtol=1e-5, atol=1e-6)


def test_gae_skips_tool_output_and_ends_after_last_policy_token(tiny):
  _, cfg = tiny
  batch = _batch()
  mask = np.asarray(batch["loss_mask_BT"])
  np.testing.assert_array_equal(mask[0], [0, 1, 1, 1, 0, 0, 1, 1])
  critic = _critic(cfg, config=CriticConfig(whiten_advantages=False))
  rl = RLConfig(algorithm="ppo", num_prompts=2, group_size=1, gamma=0.5, lam=1.0)
  adv, rows = critic.advantages(np.array([1.0, -2.0]), batch, rl)
  # values are 0, so the advantage of a policy token is gamma ** (policy tokens after it) * reward:
  # the two tool-output tokens in row 0 are not time steps and do not discount
  expected = np.zeros_like(mask)
  for b, reward in enumerate([1.0, -2.0]):
    steps = np.flatnonzero(mask[b])
    expected[b, steps] = reward * 0.5 ** np.arange(len(steps))[::-1]
  np.testing.assert_allclose(np.asarray(adv), expected, atol=1e-6)
  np.testing.assert_allclose(np.asarray(rows["returns_BT"]), expected, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(rows["loss_mask_BT"]), mask)
  assert set(rows) == {
    "input_ids_BT",
    "segment_ids_BT",
    "positions_BT",
    "loss_mask_BT",
    "old_values_BT",
    "returns_BT",
  }

  whitened, _ = _critic(cfg).advantages(np.array([1.0, -2.0]), batch, rl)
  on = mask > 0
  w = np.asarray(whitened)
  assert abs(w[on].mean()) < 1e-5 and w[on].std() == pytest.approx(1.0, abs=1e-3) and np.all(w[~on] == 0)


def test_kl_penalty_enters_the_rewards(tiny):
  _, cfg = tiny
  batch = _batch()
  mask = np.asarray(batch["loss_mask_BT"])
  kl = np.where(mask > 0, np.linspace(0.1, 0.8, mask.size).reshape(mask.shape), 0.0).astype(np.float32)
  batch["old_logp_BT"] = jnp.full(mask.shape, -1.0)
  batch["ref_logp_BT"] = jnp.asarray(-1.0 - kl)  # log pi_old - log pi_ref = kl
  critic = _critic(cfg, config=CriticConfig(whiten_advantages=False))
  rl = RLConfig(algorithm="ppo", num_prompts=2, group_size=1, kl_reward_coef=0.5)
  _, rows = critic.advantages(np.array([1.0, 0.0]), batch, rl)
  # gamma = lam = 1 and zero values: the return is the reward minus 0.5 x the KL still to come
  to_come = np.cumsum(kl[:, ::-1], axis=1)[:, ::-1]
  expected = np.where(mask > 0, np.array([[1.0], [0.0]]) - 0.5 * to_come, 0.0)
  np.testing.assert_allclose(np.asarray(rows["returns_BT"]), expected, atol=1e-5)
  assert float(critic.last_metrics["kl_reward"]) == pytest.approx(kl[mask > 0].mean(), rel=1e-5)
  del batch["ref_logp_BT"]
  with pytest.raises(ValueError, match="ref_logp_BT"):
    critic.advantages(np.array([1.0, 0.0]), batch, rl)


def test_critic_updates_lower_the_value_loss_and_touch_only_the_critic(tiny):
  _, cfg = tiny
  policy = state_lib.TrainState.create(
    Qwen3(cfg, rngs=nnx.Rngs(0)),
    state_lib.make_optimizer({"learning_rate": 1e-2, "schedule": "constant"}, 10)[0],
    jax.random.key(0),
  )
  policy_before = jax.tree.map(np.asarray, policy.params)
  critic = _critic(cfg, config=CriticConfig(clip_value=None))
  batch = _batch()
  _, rows = critic.advantages(np.array([1.0, -0.5]), batch, RLConfig(algorithm="ppo", group_size=1))
  before = jax.tree.map(np.asarray, critic.state.params)
  losses = [float(critic.update(rows)["vf_loss"]) for _ in range(8)]
  assert losses[-1] < 0.5 * losses[0], losses
  after = critic.state.params
  assert not np.allclose(before["value_kernel"], after["value_kernel"])
  assert any(
    not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before["backbone"]), jax.tree.leaves(after["backbone"]))
  )
  for a, b in zip(jax.tree.leaves(policy_before), jax.tree.leaves(policy.params)):
    np.testing.assert_array_equal(a, b)
  assert int(critic.state.step) == 8 and int(policy.step) == 0

  clipped = _critic(cfg, config=CriticConfig(clip_value=1e-3))
  _, rows = clipped.advantages(np.array([1.0, -0.5]), batch, RLConfig(algorithm="ppo", group_size=1))
  clipped.update(rows)
  m = clipped.update(rows)  # the second step moves values past the clip range around the rollout values
  assert 0 < float(m["vf_clipfrac"]) <= 1


class LengthReward:
  """Reward: the response's length mod 5, scaled to [0, 1] (a signal that varies across samples)."""

  def __call__(self, response, ground_truth, info=None):
    score = (len(response) % 5) / 4
    return RewardResult(score, score > 0.5, None, True)


def test_ppo_step_end_to_end(tiny):
  tokenizer, cfg = tiny
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  tx, _ = state_lib.make_optimizer({"learning_rate": 1e-2, "schedule": "constant", "grad_clip_norm": 1.0}, 100)
  state = state_lib.TrainState.create(model, tx, jax.random.key(0))
  engine = JaxEngine(
    model,
    tokenizer=tokenizer,
    max_length=96,
    max_batch_size=8,
    min_batch_bucket=8,
    min_prompt_bucket=64,
    min_new_bucket=16,
    seed=0,
  )
  items = [{"prompt": prompt_ids(tokenizer, p), "answer": p.answer} for p in make_problems(16, seed=0)]
  rl = RLConfig(
    algorithm="ppo",
    num_prompts=4,
    group_size=2,
    num_minibatches=2,
    num_epochs=2,
    length_multiple=32,
    kl_reward_coef=0.05,
    lam=0.95,
  )
  kwargs = dict(
    engine=engine,
    tokenizer=tokenizer,
    tools=None,
    multiturn=MultiTurnConfig(
      max_context=80, max_turns=2, max_new_tokens=12, call_formats=("code",), enable_thinking=False
    ),
    reward_fn=LengthReward(),
    prompts=iter([items]),
    reference=state_lib.make_reference(1.0, state, jax.tree.map(lambda _: None, state)),
  )
  with pytest.raises(ValueError, match="needs a critic"):
    RLTrainer(rl, state, **kwargs)
  critic = _critic(cfg)
  trainer = RLTrainer(rl, state, critic=critic, **kwargs)
  policy_before = jax.tree.map(np.asarray, trainer.state.params)
  critic_before = jax.tree.map(np.asarray, critic.state.params)
  metrics = trainer.step()
  trainer.close()
  assert int(trainer.state.step) == 4 and int(critic.state.step) == 4  # same minibatches and epochs
  assert engine.weight_version == 1
  for key in ("vf_loss", "vf_clipfrac", "values_mean", "returns_mean", "vf_explained_var", "kl_reward", "loss"):
    assert key in metrics and np.isfinite(metrics[key]), key
  assert metrics["kl_reward"] == pytest.approx(0.0, abs=1e-5)  # the first rollout is the reference's
  assert metrics["reward_std"] > 0
  for before, after in ((policy_before, trainer.state.params), (critic_before, critic.state.params)):
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("name", ["retool_qwen3_4b_ppo", "ppo_tiny"])
def test_ppo_configs_parse(name):
  c = _load(name)
  assert check_config(c).__name__ == "retool_jax.train.rl_run"
  rl = RLConfig.from_config(c.rl)
  MultiTurnConfig.from_config(c.rollout)
  assert rl.algorithm == "ppo" and rl.kl_reward_coef > 0 and not rl.loss.kl_coef
  assert CriticConfig(clip_value=c.critic.clip_value, whiten_advantages=c.critic.whiten_advantages)
  c.critic.clip_valu = 0.3
  with pytest.raises(ValueError, match="clip_valu"):
    check_config(c)


def test_critic_config_from_config():
  assert CriticConfig.from_config({"clip_value": 0.5}) == dataclasses.replace(CriticConfig(), clip_value=0.5)
  with pytest.raises(ValueError, match=r"unknown critic field\(s\) \['clip'\]"):
    CriticConfig.from_config({"clip": 0.5})


def test_run_config_builds_a_sharded_critic():
  c = _load("ppo_tiny")
  c.model.overrides.vocab_size = 128
  mesh = sharding_lib.make_mesh(**c.mesh.to_dict())
  critic = build_critic(c, mesh, total_updates=4)
  assert critic.config == CriticConfig(clip_value=0.2, whiten_advantages=True)
  np.testing.assert_array_equal(critic.state.params["value_kernel"], 0.0)
  batch = _batch()
  _, rows = critic.advantages(np.array([1.0, 0.0]), batch, RLConfig(algorithm="ppo", group_size=1))
  with jax.set_mesh(mesh):
    m = critic.update(rows)
  assert np.isfinite(float(m["vf_loss"])) and int(critic.state.step) == 1
  assert not np.allclose(critic.state.params["value_kernel"], 0.0)
