"""RL with a user's agent (`rollout.agent`): an OpenAI-client agent trains exactly as the same agent written
against `ChatClient`."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from retool_jax.models.qwen3 import Qwen3, Qwen3Config
from retool_jax.rewards import get_reward
from retool_jax.rollout import JaxEngine, MultiTurnConfig
from retool_jax.train import state as state_lib
from retool_jax.train.rl import RLTrainer
from retool_jax.train.rl_agent import AgentSpec, split_agent
from retool_jax.train.rl_config import RLConfig
from test_multiturn import TOK

QUESTIONS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(2, 3), (4, 4), (1, 6), (5, 2)]]


async def chat_agent(client, prompt, tools):
  messages = [{"role": "user", "content": prompt}]
  reply = await client.chat(messages, max_tokens=6)
  messages += [reply, {"role": "user", "content": "Check it, then box it."}]
  return (await client.chat(messages, max_tokens=6))["content"]


async def openai_agent(client, prompt, tools):
  messages = [{"role": "user", "content": prompt}]
  r = await client.chat.completions.create(model="policy", messages=messages, max_tokens=6)
  messages += [
    r.choices[0].message.model_dump(exclude_none=True),
    {"role": "user", "content": "Check it, then box it."},
  ]
  r = await client.chat.completions.create(model="policy", messages=messages, max_tokens=6)
  return r.choices[0].message.content


async def failing_agent(client, prompt, tools):
  raise RuntimeError("the agent fell over")


def trainer_with(agent):
  cfg = Qwen3Config(
    vocab_size=len(TOK),
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    tie_word_embeddings=True,
    max_position_embeddings=128,
  )
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  tx, _ = state_lib.make_optimizer({"learning_rate": 1e-2, "schedule": "constant", "grad_clip_norm": 1.0}, 10)
  state = state_lib.TrainState.create(model, tx, jax.random.key(0))
  engine = JaxEngine(model, tokenizer=TOK, max_length=96, max_batch_size=8, min_prompt_bucket=32, seed=0)
  rl = RLConfig(num_prompts=2, group_size=2, num_minibatches=1, num_epochs=1, length_multiple=32)
  mt = MultiTurnConfig(max_context=96, enable_thinking=False, temperature=1.0)
  trainer = RLTrainer(
    rl,
    state,
    engine=engine,
    tokenizer=TOK,
    tools=None,
    multiturn=mt,
    reward_fn=get_reward("math"),
    prompts=iter([QUESTIONS[:2], QUESTIONS[2:]]),
    agent=agent,
  )
  seen = []
  sample = trainer._sample_groups

  async def recording(*args, **kwargs):
    out = await sample(*args, **kwargs)
    seen.append(out[0])
    return out

  trainer._sample_groups = recording
  return trainer, seen


def two_steps(agent):
  trainer, seen = trainer_with(agent)
  metrics = [trainer.step() for _ in range(2)]
  params = jax.tree.map(np.asarray, trainer.state.params)
  trainer.close()
  return metrics, [r for batch in seen for r in batch], params


def test_an_openai_client_agent_trains_exactly_as_the_same_chat_client_agent():
  chat_metrics, chat_rollouts, chat_params = two_steps(AgentSpec(chat_agent, "chat"))
  oai_metrics, oai_rollouts, oai_params = two_steps(AgentSpec(openai_agent, "openai"))
  assert len(chat_rollouts) == len(oai_rollouts) == 8
  for a, b in zip(chat_rollouts, oai_rollouts):
    assert a.ids == b.ids and a.loss_mask == b.loss_mask and a.num_prompt_tokens == b.num_prompt_tokens
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    assert len(a.turns) == 2 and sum(a.loss_mask) == sum(t.generated_tokens for t in a.turns) > 0
    # the follow-up user turn is environment: loss mask 0
    text = TOK.decode(a.ids)
    assert "Check it, then box it." in text
    start = len(TOK.decode(a.ids[: a.num_prompt_tokens]))
    assert text[start:].count("<|im_start|>user") == 1
  for a, b in zip(chat_metrics, oai_metrics):
    for key in ("reward_mean", "accuracy", "response_length", "rollout_kl"):
      assert a[key] == pytest.approx(b[key], abs=1e-6), key
  for x, y in zip(jax.tree.leaves(chat_params), jax.tree.leaves(oai_params)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  assert np.isfinite(oai_metrics[-1]["pg_loss" if "pg_loss" in oai_metrics[-1] else "loss"])


def test_an_agent_that_raises_is_an_aborted_trajectory_and_the_step_still_trains():
  trainer, seen = trainer_with(AgentSpec(failing_agent, "openai"))
  metrics = trainer.step()
  trainer.close()
  [batch] = seen
  assert all(r.status == "aborted" and "fell over" in r.stop_reason and sum(r.loss_mask) == 0 for r in batch)
  assert metrics["abort_rate"] == 1.0 and metrics["reward_mean"] <= 0


def test_the_agent_options_are_checked_when_the_run_is_built():
  values, spec = split_agent({"max_context": 64, "agent": "test_rl_agent:chat_agent", "agent_client": "chat"})
  assert values == {"max_context": 64} and spec.client == "chat" and spec.agent == "test_rl_agent:chat_agent"
  assert split_agent({"max_context": 64}) == ({"max_context": 64}, None)
  with pytest.raises(ValueError, match="rollout.agent_client='http'"):
    split_agent({"agent": "test_rl_agent:chat_agent", "agent_client": "http"})
  with pytest.raises(ValueError, match="no function 'nope'"):
    split_agent({"agent": "test_rl_agent:nope"})
  with pytest.raises(ValueError, match="rollout.agent is not"):
    split_agent({"agent_client": "chat"})
  assert dataclasses.is_dataclass(spec)
