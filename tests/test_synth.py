"""Synthetic tool-use data: templated conversations (executed for real) and Toolformer-style teacher filtering."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from retool_jax.chat import load_tokenizer, parse_tool_calls
from retool_jax.data import load_chat_sft, load_gsm8k
from retool_jax.data.synth import (
  Proposal,
  chat_context,
  filter_calls,
  gsm8k_item,
  model_loss,
  number_positions,
  render_call,
  table_proposer,
  teacher_examples,
)
from retool_jax.data.synth.__main__ import main
from retool_jax.data.synth.templates import CODE_TASKS, TASKS, templated_examples
from retool_jax.demo_task.tokenizer import build_tokenizer
from retool_jax.models.logprobs import token_logprobs
from retool_jax.models.qwen3 import Qwen3
from retool_jax.rollout import JaxEngine
from retool_jax.rollout.proposer import engine_proposer
from retool_jax.tools import BUILTIN_TOOLS, default_registry
from tiny_qwen3 import tiny_config

FIXTURES = Path(
  os.environ.get("RETOOL_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures")
)
SCHEMA = {
  "type": "function",
  "function": {
    "name": "code_interpreter",
    "description": "Run Python code and return what it prints.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
  },
}


def run_python(code):
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
  return done.returncode == 0, (done.stdout if done.returncode == 0 else done.stderr)


class SubprocessRegistry:
  """A registry with one code tool that really runs Python in a subprocess (the registry interface)."""

  def __init__(self):
    self.calls = []

  def names(self):
    return ["code_interpreter"]

  def schemas(self):
    return [SCHEMA]

  def get(self, name):
    return SimpleNamespace(validate=lambda arguments: None) if name == "code_interpreter" else None

  def call_sync(self, name, arguments):
    start = time.perf_counter()
    self.calls.append(arguments["code"])
    ok, output = run_python(arguments["code"])
    return SimpleNamespace(
      output=output, ok=ok, status="ok" if ok else "error", elapsed_s=time.perf_counter() - start
    )


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(FIXTURES / "qwen3_tokenizer")


def test_templated_conversations_record_real_results(tok):
  registry = SubprocessRegistry()
  examples = templated_examples(registry, len(CODE_TASKS) + 4, seed=3)
  assert len(examples) == len(CODE_TASKS) + 4
  assert {e.metadata["task"] for e in examples} == {t.name for t in CODE_TASKS}  # every task is used
  assert len({e.messages[0]["content"] for e in examples}) == len(examples)
  for example in examples:
    user, call_turn, tool_turn, final = example.messages
    code = call_turn["tool_calls"][0]["function"]["arguments"]["code"]
    ok, output = run_python(code)  # independent re-execution: the data cannot lie
    assert ok and tool_turn["content"] == output.strip()
    assert final["content"].endswith(f"\\boxed{{{output.strip()}}}") or "\n" in output.strip()
    ids, mask = example.encode(tok)
    trained = tok.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if m])
    assert [c.arguments["code"] for c in parse_tool_calls(trained).calls] == [code]
    assert output.strip() not in trained.split("</tool_call>")[0]  # the result is not trained before the call
  assert examples[0].tools == [SCHEMA]
  # Deterministic for a seed, different across seeds.
  again = templated_examples(SubprocessRegistry(), len(CODE_TASKS) + 4, seed=3)
  assert [e.messages for e in again] == [e.messages for e in examples]
  assert [e.messages for e in templated_examples(registry, 3, seed=4)] != [e.messages for e in examples[:3]]


def test_retool_format_templates(tok):
  (example,) = templated_examples(SubprocessRegistry(), 1, fmt="retool")
  user, turn = example.messages
  assert "{query}" not in user["content"] and example.tools is None
  (call,) = parse_tool_calls(turn["content"]).calls
  ok, output = run_python(call.arguments["code"])
  assert f"<interpreter>\n{output.strip()}\n</interpreter>" in turn["content"]
  ids, mask = example.encode(tok)
  assert "<interpreter>" not in tok.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if m])


def test_failed_calls_are_dropped():
  class Failing(SubprocessRegistry):
    def call_sync(self, name, arguments):
      return SimpleNamespace(output="Traceback ...", ok=False, status="error", elapsed_s=0.0)

  assert templated_examples(Failing(), 3) == []


def copy_model_loss(prefix, continuation):
  """A tiny stand-in teacher: a word of the next few is 'easy' when it already appears in the prefix."""
  seen = set(re.findall(r"\w+", prefix))
  words = re.findall(r"\w+", continuation)[:3]
  return sum(w not in seen for w in words) / max(len(words), 1)


def test_teacher_keeps_only_calls_that_help():
  registry = SubprocessRegistry()
  prompt = "Question: what is 123 * 457?\n"
  response = "Multiplying gives 56211 in total."
  position = response.index("56211")
  proposals = [
    Proposal(position, "code_interpreter", {"code": "print(123 * 457)"}),  # the result is the next word
    Proposal(position, "code_interpreter", {"code": "print(999)"}),  # runs, but does not help
    Proposal(position, "code_interpreter", {"code": "print(("}),  # fails: never kept
  ]
  (kept,) = filter_calls(prompt, response, proposals, registry, copy_model_loss, threshold=0.2)
  assert kept.arguments == {"code": "print(123 * 457)"} and kept.output == "56211\n"
  assert kept.gain == pytest.approx(1 / 3)
  assert len(registry.calls) == 3  # every proposal was executed


def test_teacher_on_gsm8k_rows():
  problems = load_gsm8k(FIXTURES / "gsm8k" / "test.jsonl", limit=5)
  question, response, proposals = gsm8k_item(
    problems[0].metadata["problem"], problems[0].metadata["solution"], problems[0].ground_truth
  )
  assert "<<" not in response and response.endswith("\\boxed{18}.")
  assert [p.arguments["code"] for p in proposals] == ["print(16-3-4)", "print(9*2)"]
  assert response[proposals[0].position :].startswith("9 duck eggs")

  items, propose = table_proposer(
    gsm8k_item(p.metadata["problem"], p.metadata["solution"], p.ground_truth) for p in problems
  )
  examples = teacher_examples(items, propose, SubprocessRegistry(), copy_model_loss, threshold=0.3)
  assert examples, "the copy model benefits from at least one computed result"
  for example in examples:
    roles = [m["role"] for m in example.messages]
    assert roles[0] == "user" and roles[-1] == "assistant" and "tool" in roles
    for call_turn, tool_turn in zip(example.messages[1::2], example.messages[2::2]):
      if tool_turn["role"] != "tool":
        continue
      ok, output = run_python(call_turn["tool_calls"][0]["function"]["arguments"]["code"])
      assert ok and tool_turn["content"] == output
    assert all(g >= 0.3 for g in example.metadata["gains"])
    assert example.tools == [SCHEMA]


def test_every_builtin_tool_has_templates_and_real_results(tok):
  registry = default_registry()
  assert set(TASKS) == set(BUILTIN_TOOLS)
  n = sum(len(tasks) for tasks in TASKS.values())
  examples = templated_examples(registry, n, seed=1)
  assert {e.metadata["tool"] for e in examples} == set(BUILTIN_TOOLS)
  for example in examples:
    call = example.messages[1]["tool_calls"][0]["function"]
    recorded = example.messages[2]["content"]
    again = registry.call_sync(call["name"], call["arguments"]).output.strip()
    if call["name"] == "run_tests":  # pytest prints timings; compare the verdicts
      again, recorded = (re.sub(r"in [0-9.]+s", "", x) for x in (again, recorded))
    assert recorded == again, call
    assert recorded in example.messages[3]["content"]
    ids, mask = example.encode(tok)
    trained = tok.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if m])
    assert parse_tool_calls(trained, registry).errors == []


def test_cli_writes_loadable_data(tmp_path):
  out = tmp_path / "synth.jsonl"
  subprocess.run(
    [sys.executable, "-m", "retool_jax.data.synth", "templates", "--out", str(out), "--n", "3"],
    check=True,
    cwd=Path(__file__).resolve().parents[1],
    timeout=300,
  )
  examples = load_chat_sft(out)
  assert len(examples) == 3 and all(e.metadata["source"] == "synth_templates" for e in examples)
  names = {s["function"]["name"] for s in default_registry().schemas()}
  assert {e.messages[1]["tool_calls"][0]["function"]["name"] for e in examples} <= names
  assert json.loads(out.read_text().splitlines()[0])["tools"]


@pytest.mark.slow
def test_teacher_mode_with_a_tiny_model_through_the_engine():
  """Teacher mode end to end with a real (tiny) Qwen3: the engine proposes, the model's loss filters.

  The model is first fitted to one conversation in which a code call's result precedes the answer, so it has
  learnt where a call belongs and that the answer follows the result; nothing in the filter is scripted.
  """
  tok = build_tokenizer()
  context = chat_context(tok)
  prompt, response = "What is 6*7?", "6*7 = 42."
  at = response.index("42")
  assert number_positions(response) == [2, at]
  call = {"code": "print(6*7)"}
  text = context(prompt) + response[:at] + render_call("code_interpreter", call, "42\n") + response[at:]
  ids = jnp.asarray([tok.encode(text + "<|im_end|>", add_special_tokens=False)], jnp.int32)
  cfg = tiny_config(
    vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
  )
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def fit_step(model, optimizer):
    def nll(m):
      return -token_logprobs(m, ids[:, :-1], ids[:, 1:]).logprobs_BT.mean()

    value, grads = nnx.value_and_grad(nll)(model)
    optimizer.update(model, grads)
    return value

  for _ in range(150):
    value = fit_step(model, optimizer)
  assert float(value) < 0.05

  # The loss function scores exactly the continuation's tokens (bucket padding changes nothing).
  loss = model_loss(model, tok)
  prefix = context(prompt) + response[:at]
  direct = jnp.asarray([tok.encode(prefix + response[at:], add_special_tokens=False)], jnp.int32)
  n_prefix = len(tok.encode(prefix, add_special_tokens=False))
  logprobs = nnx.jit(lambda m, x: token_logprobs(m, x[:, :-1], x[:, 1:]).logprobs_BT)(model, direct)
  want = -logprobs[0, n_prefix - 1 :].mean()
  assert loss(prefix, response[at:]) == pytest.approx(float(want), rel=1e-4, abs=1e-5)

  # The engine writes a call at every number; only the one it learnt parses into a valid call.
  registry = SubprocessRegistry()
  engine = JaxEngine(model, tokenizer=tok, decode_chunk=32)
  propose = engine_proposer(engine, tok, registry=registry, context=context, max_new_tokens=96)
  proposals = propose(prompt, response)
  assert proposals == [Proposal(at, "code_interpreter", call)]
  assert engine.stats["rows"] == 2  # one request per candidate position

  # The call is executed for real and kept because its result makes the answer predictable.
  (example,) = teacher_examples([(prompt, response)], propose, registry, loss, threshold=1.0, context=context)
  assert registry.calls == ["print(6*7)"]
  assert [m["role"] for m in example.messages] == ["user", "assistant", "tool", "assistant"]
  assert example.messages[1]["content"] == "6*7 =" and example.messages[2]["content"] == "42\n"
  assert example.messages[1]["tool_calls"][0]["function"] == {"name": "code_interpreter", "arguments": call}
  (gain,) = example.metadata["gains"]
  without = min(loss(prefix, "42."), loss(prefix + render_call("code_interpreter", call, ""), "42."))
  assert gain == pytest.approx(
    without - loss(prefix + render_call("code_interpreter", call, "42\n"), "42."), abs=1e-3
  )
  assert gain > 1.0
  # A threshold above the gain keeps nothing.
  fixed = lambda p, r: proposals
  assert teacher_examples([(prompt, response)], fixed, registry, loss, threshold=gain + 0.1, context=context) == []


def test_cli_teacher_mode(tmp_path, capsys):
  out = tmp_path / "teacher.jsonl"
  args = ["teacher", "--gsm8k", str(FIXTURES / "gsm8k" / "test.jsonl"), "--limit", "3", "--out", str(out)]
  main([*args, "--loss", f"{__name__}:copy_model_loss", "--threshold", "0.3"])
  examples = load_chat_sft(out)
  assert examples and all(e.metadata["source"] == "synth_teacher" for e in examples)
  for example in examples:
    for call_turn, tool_turn in zip(example.messages[1::2], example.messages[2::2]):
      if tool_turn["role"] == "tool":
        ok, output = run_python(call_turn["tool_calls"][0]["function"]["arguments"]["code"])
        assert ok and tool_turn["content"] == output
  with pytest.raises(SystemExit, match="--loss must look like"):
    main([*args, "--loss", "no_function_here"])
