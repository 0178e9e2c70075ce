"""The multi-turn tool loop: token-exact assembly, both call formats, limits, statuses and overlap of tools."""

import asyncio
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from retool_jax.assets import QWEN3_TOKENIZER_DIR
from retool_jax.chat import SpecialIds, load_tokenizer, render_ids
from retool_jax.models import qwen3
from retool_jax.models.logprobs import token_logprobs
from retool_jax.rollout import JaxEngine, MultiTurnConfig, SGLangEngine, generate_multiturn
from retool_jax.rollout.multiturn import session_tools
from retool_jax.sandbox import Sandbox
from retool_jax.tools import ToolRegistry, tool
from scripted_engine import ScriptedEngine
from sglang_double import SGLangDouble

TOK = load_tokenizer(QWEN3_TOKENIZER_DIR)
IM_END = "<|im_end|>"
CODE_TURN = "Let me compute.\n<code>\n```python\nprint(6 * 7)\n```\n</code> text after the stop is never kept"
CALL_TURN = '<think>\nadd\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


def make_tools(delays=None):
  delays = delays or {}

  @tool
  async def code_interpreter(code: str) -> str:
    """Runs Python.

    Args:
      code: the code
    """
    await asyncio.sleep(delays.get("code_interpreter", 0))
    return "42\n" if "6 * 7" in code else f"ran {len(code)} chars\n"

  @tool
  async def add(a: int, b: int) -> str:
    """Adds.

    Args:
      a: first
      b: second
    """
    await asyncio.sleep(delays.get("add", 0))
    return str(a + b)

  return ToolRegistry([code_interpreter, add])


def prompt(question):
  return [{"role": "user", "content": question}]


def ids_of(question, tools):
  return tuple(render_ids(TOK, prompt(question), tools=tools.schemas()))


def run(coro):
  return asyncio.run(coro)


def test_code_turns_are_assembled_token_exactly():
  tools = make_tools()
  p = ids_of("What is 6*7?", tools)
  engine = ScriptedEngine(TOK, {p: [CODE_TURN, "So the answer is \\boxed{42}." + IM_END]})
  [r] = run(generate_multiturn(engine, [prompt("What is 6*7?")], tools, MultiTurnConfig(max_context=512)))
  assert r.status == "completed" and r.stop_reason == "eos"
  gen1 = TOK.encode(CODE_TURN[: CODE_TURN.index("</code>") + len("</code>")])
  obs = TOK.encode("\n\n<interpreter>\n42\n\n</interpreter>\n\n")
  gen2 = TOK.encode("So the answer is \\boxed{42}." + IM_END)
  assert r.ids == list(p) + gen1 + obs + gen2
  assert r.loss_mask == [0] * len(p) + [1] * len(gen1) + [0] * len(obs) + [1] * len(gen2)
  scripted = lambda n: [-(i + 1) / 100 for i in range(n)]
  assert r.logprobs == [0.0] * len(p) + scripted(len(gen1)) + [0.0] * len(obs) + scripted(len(gen2))
  # the engine saw exactly the assembled ids, never a re-rendering
  assert [list(q.prompt_ids) for q in engine.requests] == [list(p), list(p) + gen1 + obs]
  assert engine.requests[0].sampling.stop == ("</code>",)
  assert SpecialIds.from_tokenizer(TOK).tool_call_close in engine.requests[0].sampling.stop_token_ids
  assert [(t.tool_calls, t.tool_errors, t.observation_tokens) for t in r.turns] == [(1, 0, len(obs)), (0, 0, 0)]
  assert r.text == TOK.decode(gen1 + obs + gen2) and "\\boxed{42}" in r.text
  assert r.weight_versions == [0, 0]


def test_tool_call_turns_get_tool_response_turns_and_errors_are_readable():
  tools = make_tools()
  p = ids_of("Add 2 and 3, then more.", tools)
  bad = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}\n</tool_call>'  # missing brace
  unknown = '<tool_call>\n{"name": "mul", "arguments": {}}\n</tool_call>'
  engine = ScriptedEngine(TOK, {p: [CALL_TURN, bad, unknown, "Done: 5." + IM_END]})
  [r] = run(generate_multiturn(engine, [p], tools, {"max_context": 1024, "temperature": 0.0}))
  assert r.status == "completed"
  assert [t.tool_calls for t in r.turns] == [1, 1, 1, 0]
  assert [t.tool_errors for t in r.turns] == [0, 1, 1, 0]
  first_obs = TOK.encode(
    f"{IM_END}\n<|im_start|>user\n<tool_response>\n5\n</tool_response>{IM_END}\n<|im_start|>assistant\n"
  )
  gen1 = TOK.encode(CALL_TURN)
  assert gen1[-1] == SpecialIds.from_tokenizer(TOK).tool_call_close
  assert r.ids[len(p) : len(p) + len(gen1) + len(first_obs)] == gen1 + first_obs
  assert "is not valid JSON" in r.text and "unknown tool 'mul'" in r.text
  ids, mask = np.asarray(r.ids), np.asarray(r.loss_mask)
  assert TOK.decode(ids[mask == 1]) == CALL_TURN + bad + unknown + "Done: 5." + IM_END


def test_limits_end_trajectories_as_truncated():
  tools = make_tools()
  many = [CALL_TURN] * 5
  p = ids_of("loop", tools)
  [r] = run(generate_multiturn(ScriptedEngine(TOK, {p: many}), [p], tools, MultiTurnConfig(max_tool_calls=2)))
  assert (r.status, r.stop_reason, r.tool_calls, len(r.turns)) == ("truncated", "max_tool_calls", 2, 3)
  [r] = run(generate_multiturn(ScriptedEngine(TOK, {p: many}), [p], tools, MultiTurnConfig(max_turns=2)))
  assert (r.status, r.stop_reason, r.tool_calls) == ("truncated", "max_turns", 2)

  obs = TOK.encode(
    f"{IM_END}\n<|im_start|>user\n<tool_response>\n5\n</tool_response>{IM_END}\n<|im_start|>assistant\n"
  )
  budget = len(p) + len(TOK.encode(CALL_TURN)) + len(obs) + 12  # the second turn is cut by the token budget
  [r] = run(generate_multiturn(ScriptedEngine(TOK, {p: many}), [p], tools, MultiTurnConfig(max_context=budget)))
  assert (r.status, r.stop_reason, len(r.ids), len(r.loss_mask), len(r.logprobs)) == (
    "truncated",
    "max_context",
    budget,
    budget,
    budget,
  )
  assert [t.finish_reason for t in r.turns] == ["stop", "length"] and r.turns[-1].generated_tokens == 12

  budget = len(p) + len(TOK.encode(CALL_TURN)) + 5  # the observation overflows: cut to the budget exactly
  [r] = run(generate_multiturn(ScriptedEngine(TOK, {p: many}), [p], tools, MultiTurnConfig(max_context=budget)))
  assert (r.status, r.stop_reason, len(r.ids)) == ("truncated", "max_context", budget)
  assert r.loss_mask[-5:] == [0] * 5


def test_response_cap_bounds_what_follows_the_prompt():
  tools = make_tools()
  many = [CALL_TURN] * 5
  p = ids_of("loop", tools)
  cap = len(TOK.encode(CALL_TURN)) + 20  # turn 1, its observation, then part of turn 2
  config = MultiTurnConfig(max_context=4096, max_response_tokens=cap)
  engine = ScriptedEngine(TOK, {p: many})
  [r] = run(generate_multiturn(engine, [p], tools, config))
  assert (r.status, r.stop_reason, len(r.ids) - r.num_prompt_tokens) == ("truncated", "max_response_tokens", cap)
  assert len(r.loss_mask) == len(r.logprobs) == len(r.ids)
  assert engine.requests[-1].sampling.max_new_tokens == len(p) + cap - len(engine.requests[-1].prompt_ids)
  # whichever limit comes first ends the trajectory
  tight = MultiTurnConfig(max_context=len(p) + 10, max_response_tokens=cap)
  [r] = run(generate_multiturn(ScriptedEngine(TOK, {p: many}), [p], tools, tight))
  assert (r.stop_reason, len(r.ids)) == ("max_context", len(p) + 10)
  with pytest.raises(ValueError, match="max_response_tokens=0"):
    MultiTurnConfig(max_response_tokens=0)


def test_an_engine_context_shorter_than_the_budget_truncates_over_sglang():
  """Over the real HTTP client: the server's context (64) cuts the turn below max_context, so the trajectory is
  truncated rather than sent back with no room left."""
  with SGLangDouble(eos_token_id=-1) as server:
    engine = SGLangEngine(server.url)
    run(engine.start(timeout_s=5))
    prompt_ids = [5] * 10
    [r] = run(generate_multiturn(engine, [prompt_ids], None, MultiTurnConfig(max_context=100, temperature=0.0)))
    [r2] = run(generate_multiturn(engine, [prompt_ids], None, MultiTurnConfig(max_context=100, max_new_tokens=20)))
  assert (r.status, r.stop_reason, len(r.ids), r.num_prompt_tokens) == ("truncated", "max_context", 63, 10)
  assert r.loss_mask == [0] * 10 + [1] * 53 and len(r.logprobs) == 63 and r.logprobs[:10] == [0.0] * 10
  assert (r2.status, r2.stop_reason, [t.generated_tokens for t in r2.turns]) == (
    "truncated",
    "max_context",
    [20, 20, 13],
  )
  assert engine.stats.too_long == 0 and engine.stats.completed == 4


def test_per_call_cap_continues_the_same_turn_and_observations_are_truncated():
  tools = make_tools()
  p = ids_of("long", tools)
  engine = ScriptedEngine(TOK, {p: [CODE_TURN, "ok" + IM_END]})
  [r] = run(generate_multiturn(engine, [p], tools, MultiTurnConfig(max_observation_tokens=2)))
  assert r.status == "completed" and r.turns[0].observation_truncated
  assert "<interpreter>\n42\n... [output truncated]\n</interpreter>" in r.text

  long_code = "<code>\n```python\n" + "x = 1\n" * 40 + "```\n</code>"
  engine = ScriptedEngine(TOK, {p: [long_code, "ok" + IM_END]})
  [r] = run(generate_multiturn(engine, [p], tools, MultiTurnConfig(max_new_tokens=64)))
  n = len(TOK.encode(long_code))
  assert [t.finish_reason for t in r.turns[:-2]] == ["length"] * (len(r.turns) - 2)
  assert sum(t.generated_tokens for t in r.turns[:-1]) == n and r.tool_calls == 1


def test_aborts_are_per_trajectory():
  tools = make_tools()
  p, q = ids_of("a", tools), ids_of("b", tools)
  engine = ScriptedEngine(TOK, {p: [CALL_TURN], q: ["fine" + IM_END]})
  r1, r2 = run(generate_multiturn(engine, [p, q], tools, None))
  assert (r1.status, r1.stop_reason) == ("aborted", "no scripted turn left")
  assert r2.status == "completed"

  class Broken(ScriptedEngine):
    async def generate(self, requests):
      raise ConnectionError("server went away")

  [r] = run(generate_multiturn(Broken(TOK, {}), [p], tools, None))
  assert r.status == "aborted" and "ConnectionError: server went away" in r.stop_reason


def test_slow_tool_does_not_block_other_trajectories():
  tools = make_tools({"code_interpreter": 0.6})
  slow, fast = ids_of("slow", tools), ids_of("fast", tools)
  engine = ScriptedEngine(
    TOK, {slow: [CODE_TURN, "done" + IM_END], fast: [CALL_TURN] * 4 + ["done" + IM_END]}, seconds_per_token=0.001
  )
  start = time.perf_counter()
  r_slow, r_fast = run(generate_multiturn(engine, [slow, fast], tools, None))
  wall = time.perf_counter() - start
  assert r_slow.status == r_fast.status == "completed" and r_fast.tool_calls == 4
  fast_done = max(end for _, end, key in engine.log if key == fast)
  slow_second_turn = max(start_ for start_, _, key in engine.log if key == slow)
  assert fast_done < slow_second_turn  # all five fast turns ran while the slow tool was busy
  assert r_slow.turns[0].tool_time_s >= 0.6 and wall < 0.6 + 0.5


def test_config_from_config_dict():
  cfg = ml_collections.ConfigDict({"max_context": 1000, "call_formats": ["code"], "temperature": 0.5})
  c = MultiTurnConfig.from_config(cfg)
  assert (c.max_context, c.call_formats, c.temperature) == (1000, ("code",), 0.5)
  with pytest.raises(ValueError, match=r"multi-turn config \(rollout\): unknown field\(s\) \['max_ctx'\]"):
    MultiTurnConfig.from_config({"max_ctx": 3})
  with pytest.raises(ValueError, match="observation_format='xml'"):
    MultiTurnConfig(observation_format="xml")
  with pytest.raises(ValueError, match="top_p=0"):
    MultiTurnConfig(top_p=0)
  with pytest.raises(TypeError, match=r"prompts\[0\] is a string"):
    run(generate_multiturn(ScriptedEngine(TOK, {}), ["hi"], None, None))


def test_session_tools_keep_state_per_trajectory():
  with Sandbox("process", max_workers=2) as sandbox:
    set_x = "<code>\n```python\nx = {}\n```\n</code>"
    show = "<code>\n```python\nprint(x)\n```\n</code>"
    a, b = (tuple(render_ids(TOK, prompt(q))) for q in ("a", "b"))
    engine = ScriptedEngine(
      TOK, {a: [set_x.format(1), show, "end" + IM_END], b: [set_x.format(2), show, "end" + IM_END]}
    )
    ra, rb = run(generate_multiturn(engine, [a, b], session_tools(sandbox), None))
  assert "<interpreter>\n1\n" in ra.text and "<interpreter>\n2\n" in rb.text
  assert ra.tool_errors == rb.tool_errors == 0


def test_with_the_jax_engine_logprobs_match_the_trainer():
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
  engine = JaxEngine(model, tokenizer=TOK)
  tools = None  # random weights call no tools; keep the prompt short
  prompts = [prompt("What is 1+1?"), prompt("Name a prime.")]
  config = MultiTurnConfig(max_context=60, max_new_tokens=16, max_turns=2, temperature=0.8, seed=5)
  results = run(generate_multiturn(engine, prompts, tools, config))
  width = max(len(r.ids) for r in results)
  ids = jnp.asarray([r.ids + [0] * (width - len(r.ids)) for r in results])  # right padding: causal, harmless
  trainer = np.asarray(token_logprobs(model, ids[:, :-1], ids[:, 1:], temperature=0.8).logprobs_BT)
  for r, ref in zip(results, trainer):
    assert (r.status, r.stop_reason) in {
      ("truncated", "max_turns"),
      ("truncated", "max_context"),
      ("completed", "eos"),
    }
    assert len(r.ids) == len(r.loss_mask) == len(r.logprobs) <= 60
    ref = ref[: len(r.ids) - 1]
    mask = np.asarray(r.loss_mask[1:], bool)
    assert mask.sum() == sum(t.generated_tokens for t in r.turns) > 0
    np.testing.assert_allclose(np.asarray(r.logprobs[1:])[mask], ref[mask], atol=1e-5, rtol=0)
  again = run(generate_multiturn(JaxEngine(model, tokenizer=TOK), prompts, tools, config))
  assert [r.ids for r in again] == [r.ids for r in results]  # seeded rollouts are reproducible
