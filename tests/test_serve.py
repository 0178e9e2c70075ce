"""The OpenAI-compatible server, driven by the real `openai` client over localhost HTTP."""

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import torch
import uvicorn
from flax import nnx
from transformers import Qwen3Config as HFQwen3Config
from transformers import Qwen3ForCausalLM

from retool_jax.assets import QWEN3_TOKENIZER_DIR
from retool_jax.chat import render_ids
from retool_jax.chat.tokenizer import encode_text
from retool_jax.checkpoint.hf_export import copy_tokenizer
from retool_jax.models import qwen3
from retool_jax.models.logprobs import token_logprobs
from retool_jax.rollout import (
  GenerateRequest,
  GenerateResult,
  JaxEngine,
  MultiTurnConfig,
  SamplingParams,
  run_agent,
)
from retool_jax.rollout.agentic import ChatClient, forced_prefix
from retool_jax.rollout.sglang_engine import SGLangEngine, SGLangOptions
from retool_jax.serve import ServeBackend, ServeSettings, create_app
from retool_jax.serve.backend import ContentStream
from retool_jax.serve.protocol import ChatCompletionRequest
from scripted_engine import ScriptedEngine
from sglang_double import FakeModel, SGLangDouble
from test_multiturn import CALL_TURN, IM_END, TOK, make_tools

MODEL = "tiny"
ADD = make_tools().schemas()[1]


@contextlib.contextmanager
def served(app):
  """The app on a free localhost port, in a thread; yields its base URL."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    assert time.monotonic() < deadline, "the server did not start"
    time.sleep(0.01)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(10)


def client_of(url, session=None):
  base = f"{url}/sessions/{session}/v1" if session else f"{url}/v1"
  return openai.OpenAI(base_url=base, api_key="none", max_retries=0)


def backend(engine, **settings):
  config = settings.pop("config", MultiTurnConfig(max_context=1024))
  return ServeBackend(engine, TOK, ServeSettings(config, **settings), model_name=MODEL)


def ids(messages, tools=None):
  return tuple(render_ids(TOK, messages, tools=tools))


HI = [{"role": "user", "content": "Hi"}]
ADD_Q = [{"role": "user", "content": "Add 2 and 3."}]


def tiny_model(seed=3, layers=2):
  cfg = qwen3.Qwen3Config(
    vocab_size=len(TOK),
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=layers,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
  )
  return qwen3.Qwen3(cfg, rngs=nnx.Rngs(seed))


def test_chat_models_and_health_with_the_openai_client():
  engine = ScriptedEngine(TOK, {ids(HI): ["<think>\nhello\n</think>\n\nHello there." + IM_END]})
  with served(create_app(backend(engine))) as url:
    client = client_of(url)
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.chat.completions.create(model=MODEL, messages=HI)
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
  [choice] = r.choices
  assert choice.finish_reason == "stop" and choice.message.role == "assistant"
  assert choice.message.content == "<think>\nhello\n</think>\n\nHello there."
  assert choice.message.tool_calls is None and choice.logprobs is None
  generated = TOK.encode("<think>\nhello\n</think>\n\nHello there." + IM_END)
  assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids(HI)), len(generated))
  assert (
    r.usage.total_tokens == len(ids(HI)) + len(generated) and r.model == MODEL and r.object == "chat.completion"
  )


def test_tool_calls_come_back_parsed_and_tool_choice_is_honoured():
  with_tools = ids(ADD_Q, [ADD])
  named = forced_prefix({"type": "function", "function": {"name": "add"}})
  engine = ScriptedEngine(
    TOK,
    {
      with_tools: [
        CALL_TURN + IM_END,
        '{"a": 4, "b": 1}}\n</tool_call>' + IM_END,
        '\n{"name": "add", "arguments": {}}\n</tool_call>' + IM_END,
      ],
      ids(ADD_Q): ['I will not call.\n<tool_call>\n{"name": "add"}\n</tool_call>' + IM_END],
    },
  )
  with served(create_app(backend(engine))) as url:
    client = client_of(url)
    auto = client.chat.completions.create(model=MODEL, messages=ADD_Q, tools=[ADD])
    forced = client.chat.completions.create(
      model=MODEL, messages=ADD_Q, tools=[ADD], tool_choice={"type": "function", "function": {"name": "add"}}
    )
    required = client.chat.completions.create(model=MODEL, messages=ADD_Q, tools=[ADD], tool_choice="required")
    none = client.chat.completions.create(model=MODEL, messages=ADD_Q, tools=[ADD], tool_choice="none")
  [call] = auto.choices[0].message.tool_calls
  assert auto.choices[0].finish_reason == "tool_calls" and call.type == "function" and call.id.startswith("call_")
  assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 2, "b": 3}
  assert auto.choices[0].message.content == "<think>\nadd\n</think>"
  # a named choice opens the reply with the call's name; the engine saw that prefix as prompt
  [call] = forced.choices[0].message.tool_calls
  assert (
    json.loads(call.function.arguments) == {"a": 4, "b": 1} and forced.choices[0].finish_reason == "tool_calls"
  )
  assert engine.requests[1].prompt_ids == with_tools + tuple(encode_text(TOK, named))
  assert engine.requests[2].prompt_ids == with_tools + tuple(encode_text(TOK, "<tool_call>\n"))
  assert required.choices[0].message.tool_calls[0].function.name == "add"
  # "none": the tools are not rendered and the reply is plain content, nothing parsed
  assert engine.requests[3].prompt_ids == ids(ADD_Q)
  assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"
  assert "<tool_call>" in none.choices[0].message.content


def test_streaming_sends_content_and_tool_call_deltas():
  engine = ScriptedEngine(TOK, {ids(ADD_Q, [ADD]): ["Let me add.\n" + CALL_TURN.split("\n\n", 1)[1] + IM_END]})
  with served(create_app(backend(engine))) as url:
    stream = client_of(url).chat.completions.create(
      model=MODEL, messages=ADD_Q, tools=[ADD], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
  content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert content == "Let me add."
  deltas = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or ()]
  assert deltas[0].id and deltas[0].function.name == "add"
  assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"a": 2, "b": 3}
  finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
  assert finishes == ["tool_calls"]
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


@pytest.fixture(scope="module")
def jax_server():
  model = tiny_model()
  engine = JaxEngine(model, tokenizer=TOK, max_length=256, max_batch_size=16)
  config = MultiTurnConfig(max_context=256, max_new_tokens=12, enable_thinking=False)
  with served(create_app(backend(engine, config=config))) as url:
    yield url, model


def test_n_seed_and_logprobs_on_the_embedded_engine(jax_server):
  url, model = jax_server
  client = client_of(url)
  kw = dict(model=MODEL, messages=HI, n=3, seed=7, temperature=0.9, max_tokens=8, logprobs=True, top_logprobs=4)
  r = client.chat.completions.create(**kw)
  again = client.chat.completions.create(**kw)
  assert len(r.choices) == 3 and [c.index for c in r.choices] == [0, 1, 2]
  assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]  # seeded
  prompt = render_ids(TOK, HI, enable_thinking=False)  # the server's contract: no thinking
  for choice in r.choices:
    tokens = choice.logprobs.content
    assert 1 <= len(tokens) <= 8 and choice.finish_reason in ("stop", "length")
    for t in tokens:
      tops = [x.logprob for x in t.top_logprobs]
      assert len(tops) == 4 and tops == sorted(tops, reverse=True) and tops[0] >= t.logprob - 1e-4
      assert bytes(t.bytes).decode() == t.token
      same = [x.logprob for x in t.top_logprobs if x.token == t.token]
      assert not same or abs(same[0] - t.logprob) < 1e-4
  assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
  assert r.usage.prompt_tokens == len(prompt)
  # the log-probs a response reports are the trainer's (the session's record gives the ids)
  one = client_of(url, session="lp").chat.completions.create(**(kw | {"n": 1, "top_logprobs": 0}))
  [seg] = httpx.get(f"{url}/sessions/lp/trajectory").json()["segments"]
  row = jnp.asarray([seg["ids"]])
  ref = np.asarray(token_logprobs(model, row[:, :-1], row[:, 1:], temperature=0.9).logprobs_BT)[
    0, len(prompt) - 1 :
  ]
  np.testing.assert_allclose([t.logprob for t in one.choices[0].logprobs.content], ref, atol=1e-5)
  np.testing.assert_allclose(seg["logprobs"][len(prompt) :], ref, atol=1e-5)


def test_completions_take_text_or_token_ids(jax_server):
  url, _ = jax_server
  client = client_of(url)
  by_text = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0, logprobs=2)
  by_ids = client.completions.create(model=MODEL, prompt=TOK.encode("The sky is"), max_tokens=5, temperature=0)
  assert by_text.choices[0].text == by_ids.choices[0].text and by_text.usage.completion_tokens <= 5
  lp = by_text.choices[0].logprobs
  assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == by_text.usage.completion_tokens
  assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0


def test_bad_requests_are_openai_errors_naming_the_field_and_the_server_lives_on(jax_server):
  url, _ = jax_server
  client = client_of(url)
  cases = [
    (dict(messages=HI, temperature=5), "temperature"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), "messages"),
    (dict(messages=[]), "messages"),
    (dict(messages=HI, n=0), "n"),
    (dict(messages=HI, top_logprobs=3), "top_logprobs"),
    (
      dict(messages=HI, tools=[ADD], tool_choice={"type": "function", "function": {"name": "nope"}}),
      "tool_choice",
    ),
    (dict(messages=HI, presence_penalty=1.0), "presence_penalty"),
    (
      dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
      "messages.0.content.0",
    ),
    (dict(messages=[{"role": "user", "content": "x" * 3000}]), "messages"),
  ]
  for kwargs, param in cases:
    with pytest.raises(openai.BadRequestError) as e:
      client.chat.completions.create(model=MODEL, **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param, (kwargs, e.value.body)
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]
  with pytest.raises(openai.NotFoundError) as e:
    client.chat.completions.create(model="gpt-9", messages=HI)
  assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(model=MODEL, prompt=[len(TOK) + 5])
  assert e.value.body["param"] == "prompt"
  raw = httpx.post(
    f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
  )
  assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
  assert httpx.get(f"{url}/v2/nothing").json()["error"]["type"] == "not_found_error"
  with pytest.raises(openai.BadRequestError) as e:
    client_of(url, session="s1").chat.completions.create(model=MODEL, messages=HI, n=2)
  assert e.value.body["param"] == "n"
  assert (
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices[0].finish_reason == "length"
  )


def test_503_while_the_model_loads_then_ready():
  gate = threading.Event()
  engine = ScriptedEngine(TOK, {ids(HI): ["Hello." + IM_END]})

  def load():
    gate.wait(30)
    return backend(engine)

  with served(create_app(load=load)) as url:
    health = httpx.get(f"{url}/health")
    assert health.status_code == 503 and health.json()["status"] == "loading"
    with pytest.raises(openai.InternalServerError) as e:
      client_of(url).chat.completions.create(model=MODEL, messages=HI)
    assert e.value.status_code == 503 and e.value.body["code"] == "model_loading"
    gate.set()
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/health").status_code != 200:
      assert time.monotonic() < deadline
      time.sleep(0.02)
    assert client_of(url).chat.completions.create(model=MODEL, messages=HI).choices[0].message.content == "Hello."


def test_a_full_queue_answers_429():
  engine = ScriptedEngine(TOK, {ids(HI): ["Hello there, friend." + IM_END] * 4}, seconds_per_token=0.05)

  async def go(url):
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    calls = [client.chat.completions.create(model=MODEL, messages=HI, n=2) for _ in range(2)]
    return await asyncio.gather(*calls, return_exceptions=True)

  with served(create_app(backend(engine, max_pending=3))) as url:
    with pytest.raises(openai.RateLimitError) as e:
      client_of(url).chat.completions.create(model=MODEL, messages=HI, n=4)
    done = asyncio.run(go(url))
  assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
  assert sorted(type(d).__name__ for d in done) == ["ChatCompletion", "RateLimitError"]


def _openai_loop(client, question, tools):
  """A tool loop over the sync OpenAI client (answers calls and malformed calls)."""
  messages = [{"role": "user", "content": question}]
  for _ in range(4):
    m = client.chat.completions.create(model=MODEL, messages=messages, tools=tools.schemas()).choices[0].message
    messages.append(m.model_dump(exclude_none=True))
    if not m.tool_calls:
      return m.content
    for c in m.tool_calls:
      out = str(sum(json.loads(c.function.arguments).values()))
      messages.append({"role": "tool", "tool_call_id": c.id, "content": out})


async def _chat_loop(client, question, tools):
  """The same loop over `ChatClient`."""
  messages = [{"role": "user", "content": question}]
  for _ in range(4):
    reply = await client.chat(messages, tools=tools.schemas())
    messages.append(reply)
    if not reply.get("tool_calls"):
      return reply["content"]
    for c in reply["tool_calls"]:
      messages.append({"role": "tool", "content": str(sum(json.loads(c["function"]["arguments"]).values()))})


def test_a_session_records_the_trajectory_the_in_process_agent_records():
  tools = make_tools()
  p = ids(ADD_Q, tools.schemas())
  script = {p: [CALL_TURN + IM_END, "<think>\nok\n</think>\n\nIt is \\boxed{5}." + IM_END]}
  served_engine, local_engine = ScriptedEngine(TOK, script), ScriptedEngine(TOK, script)
  with served(create_app(backend(served_engine))) as url:
    answer = _openai_loop(client_of(url, session="traj-1"), "Add 2 and 3.", tools)
    record = httpx.get(f"{url}/sessions/traj-1/trajectory").json()
    assert httpx.delete(f"{url}/sessions/traj-1").json()["deleted"]
    assert httpx.get(f"{url}/sessions/traj-1/trajectory").status_code == 404
  [local] = asyncio.run(
    run_agent(
      local_engine, lambda c, q, t: _chat_loop(c, q, t), ["Add 2 and 3."], tools, MultiTurnConfig(max_context=1024)
    )
  )
  assert answer == local.output == "<think>\nok\n</think>\n\nIt is \\boxed{5}."
  [seg] = record["segments"]
  r = local.rollout
  assert (seg["ids"], seg["loss_mask"], seg["logprobs"]) == (r.ids, r.loss_mask, r.logprobs)
  assert seg["num_prompt_tokens"] == len(p) and sum(seg["loss_mask"]) == sum(t.generated_tokens for t in r.turns)
  assert [q.prompt_ids for q in served_engine.requests] == [q.prompt_ids for q in local_engine.requests]


def test_64_concurrent_sessions_neither_lose_nor_cross_a_trajectory():
  model = tiny_model(seed=5)
  config = MultiTurnConfig(max_context=160, max_new_tokens=10, temperature=0.0, enable_thinking=False)
  questions = [f"Question number {i}: what is {i} + {i}?" for i in range(64)]

  async def two_turns_openai(client, question):
    messages = [{"role": "user", "content": question}]
    m = (await client.chat.completions.create(model=MODEL, messages=messages)).choices[0].message
    messages += [m.model_dump(exclude_none=True), {"role": "user", "content": f"Again for {question[:18]}"}]
    await client.chat.completions.create(model=MODEL, messages=messages)

  async def two_turns_chat(client, question, tools):
    messages = [{"role": "user", "content": question}]
    reply = await client.chat(messages)
    await client.chat(messages + [reply, {"role": "user", "content": f"Again for {question[:18]}"}])

  async def clients(url):
    cs = [openai.AsyncOpenAI(base_url=f"{url}/sessions/q{i}/v1", api_key="none", max_retries=0) for i in range(64)]
    await asyncio.gather(*(two_turns_openai(c, q) for c, q in zip(cs, questions)))

  engine = JaxEngine(model, tokenizer=TOK, max_length=160, max_batch_size=16)
  with served(create_app(backend(engine, config=config))) as url:
    asyncio.run(clients(url))
    records = [httpx.get(f"{url}/sessions/q{i}/trajectory").json()["segments"] for i in range(64)]
  local = asyncio.run(
    run_agent(
      JaxEngine(model, tokenizer=TOK, max_length=160, max_batch_size=16), two_turns_chat, questions, None, config
    )
  )
  for i, (segs, ref) in enumerate(zip(records, local)):
    assert len(segs) == 1, f"session q{i} split into {len(segs)} segments"
    text = TOK.decode(segs[0]["ids"])
    assert f"Question number {i}:" in text and f"Again for Question number {i}" in text
    assert segs[0]["ids"] == ref.rollout.ids and segs[0]["loss_mask"] == ref.rollout.loss_mask
    np.testing.assert_allclose(segs[0]["logprobs"], ref.rollout.logprobs, atol=1e-5)


def test_session_clients_made_by_the_server_are_chat_clients():
  b = backend(ScriptedEngine(TOK, {}))
  assert isinstance(b.sessions.get("a"), ChatClient) and "a" in b.sessions and len(b.sessions) == 1


def test_the_serve_command_loads_an_hf_folder_and_answers(tmp_path):
  torch.manual_seed(0)
  cfg = HFQwen3Config(
    vocab_size=151936,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    tie_word_embeddings=True,
    max_position_embeddings=512,
  )
  folder = tmp_path / "tiny-qwen3"
  Qwen3ForCausalLM(cfg).eval().save_pretrained(folder)
  copy_tokenizer(QWEN3_TOKENIZER_DIR, str(folder))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "retool_jax.serve", "--checkpoint", str(folder), "--port", str(port)]
  proc = subprocess.Popen(
    cmd + ["--max-new-tokens", "8"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
  )
  url = f"http://127.0.0.1:{port}"
  try:
    deadline, status = time.monotonic() + 120, None
    while status != 200:
      assert proc.poll() is None, proc.stdout.read().decode()
      assert time.monotonic() < deadline, "the server did not become ready"
      try:
        status = httpx.get(f"{url}/health").status_code
      except httpx.TransportError:
        pass
      time.sleep(0.2)
    client = client_of(url)
    assert [m.id for m in client.models.list().data] == ["tiny-qwen3"]
    r = client.chat.completions.create(model="tiny-qwen3", messages=HI, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 8
  finally:
    proc.terminate()
    proc.wait(30)
  bad = subprocess.run(
    [sys.executable, "-m", "retool_jax.serve", "--checkpoint", str(tmp_path / "missing")],
    env=env,
    capture_output=True,
    text=True,
  )
  assert bad.returncode != 0 and "missing" in bad.stderr and "Traceback" not in bad.stderr


def test_a_streamed_reply_arrives_in_pieces_that_add_up_to_the_reply(jax_server):
  url, _ = jax_server
  client = client_of(url)
  kw = dict(model=MODEL, messages=HI, max_tokens=40, temperature=0.8, seed=3)
  whole = client.chat.completions.create(**kw).choices[0]
  stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
  arrivals, pieces, finish = [], [], None
  for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
      arrivals.append(time.monotonic())
      pieces.append(chunk.choices[0].delta.content)
    if chunk.choices and chunk.choices[0].finish_reason:
      finish = chunk.choices[0].finish_reason
    usage = chunk.usage
  assert "".join(pieces) == whole.message.content and finish == whole.finish_reason
  assert len(pieces) >= 2  # the engine decodes 16 tokens a chunk: the first ones come before the reply ends
  assert usage.completion_tokens == 40 or finish == "stop"


def test_content_deltas_hold_back_calls_stop_strings_and_partial_characters():
  def deltas(text, final, **req):
    stream = ContentStream(TOK, ChatCompletionRequest(model=MODEL, messages=HI, **req), ("tool_call", "code"))
    out = [stream.feed([t]) for t in TOK.encode(text)]
    return [d for d in out if d], stream.finish(final)

  sent, rest = deltas(
    "Let me add.\n<tool_call>\n" + '{"name": "add", "arguments": {}}\n</tool_call>', "Let me add."
  )
  assert "".join(sent) == "Let me add." and not any("<" in d for d in sent) and rest == ""
  sent, rest = deltas("The answer is 42 STOP", "The answer is 42", stop=["STOP"])
  assert "".join(sent) + rest == "The answer is 42" and "ST" not in "".join(sent)
  sent, rest = deltas("Café ☕ ok", "Café ☕ ok")
  assert "".join(sent) + rest == "Café ☕ ok" and all("\ufffd" not in d for d in sent)
  sent, rest = deltas('{"a": 1}}\n</tool_call>', "", tool_choice="required", tools=[ADD])
  assert sent == [] and rest == ""


def test_the_engine_streams_final_tokens_chunk_by_chunk_then_the_result():
  engine = JaxEngine(tiny_model(seed=9), tokenizer=TOK, max_length=128, max_batch_size=4, decode_chunk=4)
  request = GenerateRequest(tuple(ids(HI)), SamplingParams(temperature=0.8, max_new_tokens=20, seed=1))

  async def go():
    items = [item async for item in engine.generate_stream(request)]
    [whole] = await engine.generate([request])
    return items, whole

  items, whole = asyncio.run(go())
  *deltas, result = items
  assert isinstance(result, GenerateResult) and len(deltas) >= 3
  assert [t for d, _ in deltas for t in d] == result.output_ids == whole.output_ids
  np.testing.assert_allclose([x for _, lp in deltas for x in lp], result.output_logprobs)


def test_the_server_fronts_sglang_and_records_its_tokens():
  with SGLangDouble(model=FakeModel(vocab_size=len(TOK)), eos_token_id=-1) as sglang:
    engine = SGLangEngine(sglang.url, options=SGLangOptions(backoff_s=0.01, max_backoff_s=0.02, poll_s=0.02))
    with served(create_app(backend(engine))) as url:
      r = client_of(url, session="g1").chat.completions.create(
        model=MODEL, messages=HI, max_tokens=7, temperature=0
      )
      [seg] = httpx.get(f"{url}/sessions/g1/trajectory").json()["segments"]
      with pytest.raises(openai.BadRequestError) as e:
        client_of(url).chat.completions.create(model=MODEL, messages=HI, logprobs=True, top_logprobs=2)
    [body] = [b for path, b in sglang.log if path == "/generate"]
  prompt = list(ids(HI))
  assert body["input_ids"] == prompt and r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
  assert seg["ids"][: len(prompt)] == prompt and len(seg["ids"]) == len(prompt) + 7
  assert seg["loss_mask"] == [0] * len(prompt) + [1] * 7
  assert r.choices[0].message.content == TOK.decode(seg["ids"][len(prompt) :])
  assert e.value.body["param"] == "top_logprobs"
