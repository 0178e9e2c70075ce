"""The terminal chat: tool calls and results shown, confirmation before code, commands, checkpoint loading."""

import pytest
import torch
from transformers import Qwen3Config as HFQwen3Config
from transformers import Qwen3ForCausalLM

from retool_jax.assets import QWEN3_TOKENIZER_DIR
from retool_jax.chat import load_tokenizer, render_ids
from retool_jax.chat_cli import DECLINED, ChatSession, ChatSettings, is_hf_folder, main, tokenizer_dir
from retool_jax.checkpoint.hf_export import copy_tokenizer
from retool_jax.tools import default_registry
from scripted_engine import ScriptedEngine

TOK = load_tokenizer(QWEN3_TOKENIZER_DIR)
QUESTION = "What is 2**10?"
CALL = '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(2**10)"}}\n</tool_call><|im_end|>'
ANSWER = "It is 1024.<|im_end|>"


@pytest.fixture(scope="module")
def tools():
  return default_registry()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny random Qwen3 with the real vocabulary, saved as a Hugging Face folder with its tokenizer."""
  path = tmp_path_factory.mktemp("tiny_hf")
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
    max_position_embeddings=4096,
  )
  Qwen3ForCausalLM(cfg).eval().save_pretrained(path)
  copy_tokenizer(QWEN3_TOKENIZER_DIR, str(path))
  return path


def prompt_key(tools, question=QUESTION):
  return tuple(render_ids(TOK, [{"role": "user", "content": question}], tools=tools.schemas()))


class Console:
  """Scripted input lines and captured output."""

  def __init__(self, *lines):
    self.lines, self.prompts, self.out = list(lines), [], []

  def ask(self, prompt):
    self.prompts.append(prompt)
    if not self.lines:
      raise EOFError
    return self.lines.pop(0)

  def say(self, text):
    self.out.append(text)

  @property
  def text(self):
    return "\n".join(self.out)


def session(engine, tools, console, **settings):
  return ChatSession(engine, TOK, tools, ChatSettings(**settings), ask=console.ask, say=console.say)


def test_tool_call_runs_after_yes_and_its_result_is_shown_and_sent(tools):
  engine = ScriptedEngine(TOK, {prompt_key(tools): [CALL, ANSWER]})
  console = Console(QUESTION, "yes", "/exit")
  session(engine, tools, console).loop()
  assert "run code_interpreter? [y/N] " in console.prompts
  assert "tool call> code_interpreter(\nprint(2**10)\n)" in console.out
  assert "tool result> 1024\n" in console.out
  assert console.out[-1] == "assistant> It is 1024."
  second = TOK.decode(engine.requests[1].prompt_ids)
  assert second.endswith("<tool_response>\n1024\n\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
  assert console.prompts.count("you> ") == 2 and not console.lines  # /exit ended the loop


def test_no_declines_and_tells_the_model(tools):
  engine = ScriptedEngine(TOK, {prompt_key(tools): [CALL, ANSWER]})
  console = Console(QUESTION, "no")
  chat = session(engine, tools, console)
  chat.loop()
  assert f"tool result> {DECLINED}" in console.out
  assert not any(line.startswith("tool result> 1024") for line in console.out)
  assert f"<tool_response>\n{DECLINED}\n</tool_response>" in TOK.decode(engine.requests[1].prompt_ids)
  assert chat.messages[-2] == {"role": "tool", "content": DECLINED}


def test_no_confirm_runs_without_asking_and_a_malformed_call_is_answered(tools):
  bad = "<tool_call>\n{not json}\n</tool_call><|im_end|>"
  engine = ScriptedEngine(TOK, {prompt_key(tools): [bad, CALL, ANSWER]})
  console = Console(QUESTION)
  session(engine, tools, console, confirm=False).loop()
  assert not any(p.startswith("run ") for p in console.prompts)
  errors = [line for line in console.out if line.startswith("tool call error> ")]
  assert len(errors) == 1 and errors[0][len("tool call error> ") :] in TOK.decode(engine.requests[1].prompt_ids)
  assert "tool result> 1024\n" in console.out and console.out[-1] == "assistant> It is 1024."


def test_tool_timeout_becomes_a_result(tools):
  slow = (
    '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "import time; time.sleep(5)"}}\n</tool_call>'
  )
  engine = ScriptedEngine(TOK, {prompt_key(tools): [slow + "<|im_end|>", ANSWER]})
  console = Console(QUESTION)
  session(engine, tools, console, confirm=False, timeout_s=0.5).loop()
  assert "tool result> Error: code_interpreter did not finish within 0.5 s" in console.out


def test_commands_tools_reset_exit(tools):
  engine = ScriptedEngine(TOK, {prompt_key(tools): ["Hello.<|im_end|>", "Hello again.<|im_end|>"]})
  console = Console("/tools", QUESTION, "/reset", QUESTION, "/nope", "/exit", "never read")
  chat = session(engine, tools, console)
  chat.loop()
  listing = console.out[1].splitlines()
  assert [line.split(":")[0] for line in listing] == tools.names()
  assert "(conversation cleared)" in console.out
  # after /reset the second question is a fresh conversation: the same prompt ids as the first
  assert [list(r.prompt_ids) for r in engine.requests] == [list(prompt_key(tools))] * 2
  assert chat.messages == [
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": "Hello again."},
  ]
  assert any("unknown command '/nope'" in line for line in console.out)
  assert console.lines == ["never read"]


def test_main_reads_an_hf_folder_and_its_tokenizer(hf_dir, tools):
  assert is_hf_folder(hf_dir) and tokenizer_dir(hf_dir) == hf_dir
  assert tokenizer_dir(hf_dir.parent) == QWEN3_TOKENIZER_DIR
  engine = ScriptedEngine(TOK, {prompt_key(tools): [ANSWER]})
  console = Console(QUESTION, "/exit")
  main(
    ["--checkpoint", str(hf_dir), "--temperature", "0.3"],
    ask=console.ask,
    say=console.say,
    engine=engine,
    tools=tools,
  )
  assert console.out[-1] == "assistant> It is 1024."
  assert engine.requests[0].sampling.temperature == 0.3


def test_bad_arguments_are_named(tmp_path):
  with pytest.raises(SystemExit):
    main(["--timeout", "0"])
  with pytest.raises(FileNotFoundError, match="missing"):
    main(["--checkpoint", str(tmp_path / "missing")], ask=Console().ask, say=Console().say)


def test_real_engine_smoke(hf_dir, tools):
  console = Console(QUESTION, "/exit")
  main(
    ["--checkpoint", str(hf_dir), "--max-new-tokens", "4", "--max-context", "1024", "--no-confirm"],
    ask=console.ask,
    say=console.say,
    tools=tools,
  )
  assert console.prompts == ["you> ", "you> "]
  # the random model's reply, or (most likely with 4 tokens) the notice that it was cut
  assert console.out[-1] == "(reply cut at the token limit)" or console.out[-1].startswith("assistant> ")
  print(console.out)
