"""Agentic mode: a chat-messages agent over an engine, recorded token-exactly; the ReTool example agent."""

import asyncio

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retool_jax.chat import render_ids
from retool_jax.models import qwen3
from retool_jax.models.logprobs import token_logprobs
from retool_jax.rollout import FinishReason, JaxEngine, MultiTurnConfig, run_agent
from retool_jax.rollout.agentic import environment_text, load_agent
from retool_jax.rollout.agents import retool_agent
from retool_jax.rollout.agents.retool import DEFAULT_INSTRUCTION
from scripted_engine import ScriptedEngine
from test_multiturn import IM_END, TOK, make_tools

RETOOL = "retool_jax.rollout.agents.retool:retool_agent"
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


def run(coro):
  return asyncio.run(coro)


def question_ids(question, tools):
  messages = [{"role": "user", "content": f"{question}\n\n{DEFAULT_INSTRUCTION}"}]
  return tuple(render_ids(TOK, messages, tools=tools.schemas())), messages


def test_retool_agent_is_recorded_token_exactly():
  tools = make_tools()
  p, messages = question_ids("Add 2 and 3.", tools)
  first = "<think>\nI should add.\n</think>\n\n" + CALL + "\n" + CALL.replace('"a": 2', '"a": 4') + IM_END
  final = "<think>\nok\n</think>\n\nThe sum is \\boxed{5}." + IM_END
  engine = ScriptedEngine(TOK, {p: [first, final]})
  [out] = run(run_agent(engine, RETOOL, ["Add 2 and 3."], tools, MultiTurnConfig(max_context=2048)))
  assert out.status == "completed" and out.error is None and len(out.segments) == 1
  assert out.output == "<think>\nok\n</think>\n\nThe sum is \\boxed{5}."
  r = out.rollout
  gen1, gen2 = TOK.encode(first), TOK.encode(final)
  env = TOK.encode(
    "\n<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\n7\n"
    "</tool_response><|im_end|>\n<|im_start|>assistant\n"
  )
  assert r.ids == list(p) + gen1 + env + gen2
  assert r.loss_mask == [0] * len(p) + [1] * len(gen1) + [0] * len(env) + [1] * len(gen2)
  assert [list(q.prompt_ids) for q in engine.requests] == [list(p), list(p) + gen1 + env]
  assert (r.turns[0].tool_calls, r.turns[0].tool_errors, r.turns[0].observation_tokens) == (2, 0, len(env))
  assert r.logprobs[len(p) : len(p) + 3] == [-0.01, -0.02, -0.03]
  # re-rendering the same conversation through the template would drop the first turn's reasoning
  convo = messages + [
    {
      "role": "assistant",
      "content": first[: first.index("<tool_call>")].strip(),
      "tool_calls": [
        {"function": {"name": "add", "arguments": {"a": 2, "b": 3}}},
        {"function": {"name": "add", "arguments": {"a": 4, "b": 3}}},
      ],
    },
    {"role": "tool", "content": "5"},
    {"role": "tool", "content": "7"},
    {"role": "user", "content": "next"},
  ]
  rerendered = render_ids(TOK, convo, tools=tools.schemas())
  assert "I should add." not in TOK.decode(rerendered)


def test_environment_text_matches_the_chat_template():
  messages = [{"role": "user", "content": "hi"}]
  reply = {
    "role": "assistant",
    "content": "calling",
    "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
  }
  env = [{"role": "tool", "content": "3"}, {"role": "tool", "content": "x"}, {"role": "user", "content": "more?"}]
  for thinking in (False, True):
    full = TOK.apply_chat_template(
      messages + [reply] + env, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    tail = full[full.index(IM_END + "\n<|im_start|>user\n<tool_response>") :]  # after the generated reply
    assert environment_text(env, after_im_end=False, enable_thinking=thinking) == tail
    assert IM_END + environment_text(env, after_im_end=True, enable_thinking=thinking) == tail
  with pytest.raises(ValueError, match="tool, user or system"):
    environment_text([reply], after_im_end=True, enable_thinking=True)


def test_invalid_calls_are_answered_and_history_edits_start_a_new_segment():
  tools = make_tools()
  p, _ = question_ids("q", tools)
  bad = "<tool_call>\n{not json}\n</tool_call>" + IM_END

  async def forgetful(client, prompt, tools):
    messages = [{"role": "user", "content": f"{prompt}\n\n{DEFAULT_INSTRUCTION}"}]
    reply = await client.chat(messages, tools=tools.schemas())
    answer = [{"role": "tool", "content": e["error"]} for e in reply["invalid_tool_calls"]]
    reply2 = await client.chat(messages + [reply] + answer, tools=tools.schemas())
    # rewriting the history cannot extend the recorded ids: a new segment is rendered
    reply3 = await client.chat(messages + [{"role": "assistant", "content": "edited"}], tools=tools.schemas())
    return [reply, reply2, reply3]

  engine = ScriptedEngine(TOK, {p: [bad, "ok" + IM_END]})
  p_edit = tuple(
    render_ids(
      TOK,
      [{"role": "user", "content": f"q\n\n{DEFAULT_INSTRUCTION}"}, {"role": "assistant", "content": "edited"}],
      tools=tools.schemas(),
    )
  )
  engine.scripts[p_edit] = [TOK.encode("again" + IM_END)]
  engine.cursor[p_edit] = (0, 0)
  [out] = run(run_agent(engine, forgetful, ["q"], tools, None))
  assert out.status == "completed", out.error
  reply, reply2, reply3 = out.output
  assert "tool_calls" not in reply and "not valid JSON" in reply["invalid_tool_calls"][0]["error"]
  assert reply2["content"] == "ok" and reply3["content"] == "again"
  assert len(out.segments) == 2
  assert "not valid JSON" in out.segments[0].text and out.segments[1].ids[: len(p_edit)] == list(p_edit)


def test_load_agent_and_failures():
  assert load_agent(RETOOL) is retool_agent
  for spec, message in [
    ("nomodule_xyz:f", "cannot import"),
    ("retool_jax.rollout.agents.retool:nope", "no function"),
    ("just_a_name", "module:function"),
  ]:
    with pytest.raises(ValueError, match=message):
      load_agent(spec)

  async def crashing(client, prompt, tools):
    await client.chat([{"role": "user", "content": prompt}])
    raise KeyError("boom")

  engine = ScriptedEngine(TOK, {tuple(render_ids(TOK, [{"role": "user", "content": "x"}])): ["hi" + IM_END]})
  [out] = run(run_agent(engine, crashing, ["x"], None, None))
  assert out.status == "aborted" and out.error == "KeyError: 'boom'" and len(out.segments) == 1


def test_budget_truncates_and_limits_apply():
  tools = make_tools()
  p, _ = question_ids("loop", tools)
  engine = ScriptedEngine(TOK, {p: [CALL + IM_END] * 6})
  [out] = run(run_agent(engine, RETOOL, ["loop"], tools, MultiTurnConfig(max_tool_calls=2)))
  assert out.status == "completed" and out.rollout.tool_calls == 2 and len(out.rollout.turns) == 3
  engine = ScriptedEngine(TOK, {p: [CALL + IM_END] * 6})
  budget = len(p) + 40
  [out] = run(run_agent(engine, RETOOL, ["loop"], tools, MultiTurnConfig(max_context=budget)))
  assert out.status == "truncated" and len(out.rollout.ids) == budget
  engine = ScriptedEngine(TOK, {p: [CALL + IM_END] * 6})
  [out] = run(
    run_agent(engine, RETOOL, ["loop"], tools, MultiTurnConfig(max_context=4096, max_response_tokens=40))
  )
  assert out.status == "truncated" and out.rollout.stop_reason == "max_response_tokens"
  assert len(out.rollout.ids) == len(p) + 40


def test_agent_over_the_jax_engine_matches_trainer_logprobs():
  cfg = qwen3.Qwen3Config(
    vocab_size=len(TOK),
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
  )
  model = qwen3.Qwen3(cfg, rngs=nnx.Rngs(3))

  async def two_turns(client, prompt, tools):
    messages = [{"role": "user", "content": prompt}]
    reply = await client.chat(messages, max_tokens=16)
    return await client.chat(messages + [reply, {"role": "user", "content": "Again."}], max_tokens=16)

  config = MultiTurnConfig(max_context=200, temperature=0.8, seed=1)
  outs = run(
    run_agent(JaxEngine(model, tokenizer=TOK), two_turns, ["What is 1+1?", "Name a prime."], None, config)
  )
  width = max(len(o.rollout.ids) for o in outs)
  ids = jnp.asarray([o.rollout.ids + [0] * (width - len(o.rollout.ids)) for o in outs])
  trainer = np.asarray(token_logprobs(model, ids[:, :-1], ids[:, 1:], temperature=0.8).logprobs_BT)
  for out, ref in zip(outs, trainer):
    r = out.rollout
    assert out.status == "completed" and len(out.segments) == 1 and len(r.turns) == 2
    mask = np.asarray(r.loss_mask[1:], bool)
    assert mask.sum() == sum(t.generated_tokens for t in r.turns)
    np.testing.assert_allclose(np.asarray(r.logprobs[1:])[mask], ref[: len(r.ids) - 1][mask], atol=1e-5, rtol=0)
    assert "<|im_start|>user\nAgain.<|im_end|>" in r.text


def test_retool_agent_ends_a_code_reply_at_the_closing_tag():
  tools = make_tools()
  p, _ = question_ids("What is 6*7?", tools)
  code = "<think>\nrun it\n</think>\n\n<code>\n```python\nprint(6 * 7)\n```\n</code>"
  final = "It is \\boxed{42}." + IM_END
  engine = ScriptedEngine(TOK, {p: [code + " imagined output: 41" + IM_END, final]})
  [out] = run(run_agent(engine, RETOOL, ["What is 6*7?"], tools, MultiTurnConfig(max_context=2048)))
  assert out.status == "completed" and out.output == "It is \\boxed{42}."
  assert engine.requests[0].sampling.stop == ("</code>",)
  r = out.rollout
  gen1, gen2 = TOK.encode(code), TOK.encode(final)
  env = TOK.encode(
    environment_text([{"role": "tool", "content": "42\n"}], after_im_end=False, enable_thinking=True)
  )
  assert r.ids == list(p) + gen1 + env + gen2 and "imagined" not in r.text
  assert r.loss_mask == [0] * len(p) + [1] * len(gen1) + [0] * len(env) + [1] * len(gen2)
  assert (r.turns[0].tool_calls, r.turns[0].tool_errors) == (1, 0)


def test_an_engine_cut_below_the_budget_ends_the_agent_as_truncated():
  class ShortContext(ScriptedEngine):  # an engine whose own context ends 10 tokens into the reply
    async def generate(self, requests):
      results = await super().generate(requests)
      for res in results:
        del res.output_ids[10:], res.output_logprobs[10:]
        res.finish_reason = FinishReason("length")
      return results

  tools = make_tools()
  p, _ = question_ids("loop", tools)
  engine = ShortContext(TOK, {p: [CALL + " and more words than ten tokens here" + IM_END] * 3})
  [out] = run(run_agent(engine, RETOOL, ["loop"], tools, MultiTurnConfig(max_context=2048)))
  assert out.status == "truncated" and len(engine.requests) == 1
  assert len(out.rollout.ids) == len(p) + 10 and out.rollout.status == "truncated"
