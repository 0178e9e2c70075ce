"""A terminal chat with tools over any engine, on the agentic `ChatClient` (the same turn handling as rollouts).

    python -m retool_jax.chat --checkpoint ckpt/qwen3-1.7b              # Orbax or Hugging Face folder
    python -m retool_jax.chat --checkpoint ckpt/qwen3-1.7b --sglang-url http://localhost:30000

Every tool call and its result are shown. By default code-running tools ask before they run ("no" tells the
model the user declined); `--no-confirm` runs them straight away. Commands: /reset, /tools, /exit.
`ChatSession` takes `ask` / `say` functions, so notebooks and tests drive it without a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from retool_jax.rollout.agentic import ChatClient
from retool_jax.rollout.multiturn import MultiTurnConfig, truncate_outputs

CODE_TOOLS = frozenset({"code_interpreter", "execute_bash", "run_tests", "debug_code"})
DECLINED = "The user declined to run this tool call."
COMMANDS = {"/reset": "clear the conversation", "/tools": "list the tools", "/exit": "leave the chat"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclasses.dataclass
class ChatSettings:
  """Sampling and limits of a chat. `confirm`: ask before code-running tools; `timeout_s`: per tool call."""

  temperature: float = 0.7
  top_p: float = 0.95
  max_new_tokens: int = 1024
  max_context: int = 8192
  max_turns: int = 8
  max_observation_tokens: int = 1024
  enable_thinking: bool = True
  confirm: bool = True
  timeout_s: float = 30.0
  system: str | None = None

  def multiturn(self) -> MultiTurnConfig:
    return MultiTurnConfig(
      max_context=self.max_context,
      max_turns=self.max_turns,
      max_new_tokens=self.max_new_tokens,
      max_observation_tokens=self.max_observation_tokens,
      enable_thinking=self.enable_thinking,
      temperature=self.temperature,
      top_p=self.top_p,
    )


class ChatSession:
  """One conversation: user turns in, assistant replies and tool calls out (through `say`)."""

  def __init__(
    self,
    engine: Any,
    tokenizer: Any,
    tools: Any,
    settings: ChatSettings | None = None,
    *,
    ask: Callable[[str], str] = input,
    say: Callable[[str], None] = print,
  ):
    self.engine, self.tokenizer, self.tools = engine, tokenizer, tools
    self.settings = settings or ChatSettings()
    self.ask, self.say = ask, say
    self._loop: asyncio.AbstractEventLoop | None = None
    self.reset()

  def run(self, coro: Any) -> Any:
    """Runs a coroutine on the session's own event loop (kept across turns, as engines keep per-loop state)."""
    if self._loop is None or self._loop.is_closed():
      self._loop = asyncio.new_event_loop()
    return self._loop.run_until_complete(coro)

  def close(self) -> None:
    """Cancels what is left on the session's loop (an engine's batcher, say) and closes it."""
    loop, self._loop = self._loop, None
    if loop is None or loop.is_closed():
      return
    loop.run_until_complete(_cancel_all(asyncio.all_tasks(loop)))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()

  def reset(self) -> None:
    """Forgets the conversation."""
    self.client = ChatClient(self.engine, self.tokenizer, self.settings.multiturn())
    system = self.settings.system
    self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

  def tool_lines(self) -> list[str]:
    """One line per tool: its name and the first sentence of its description."""
    if self.tools is None:
      return ["(no tools)"]
    return [
      f"{s['function']['name']}: {s['function']['description'].split('. ')[0]}" for s in self.tools.schemas()
    ]

  def handle(self, line: str) -> bool:
    """Runs one line of input (a command or a user turn); False once the user asked to leave."""
    text = line.strip()
    if not text:
      return True
    if text == "/exit":
      return False
    if text == "/reset":
      self.reset()
      self.say("(conversation cleared)")
    elif text == "/tools":
      self.say("\n".join(self.tool_lines()))
    elif text.startswith("/"):
      self.say(f"unknown command {text.split()[0]!r}; commands: " + ", ".join(COMMANDS))
    else:
      self.run(self.send(text))
    return True

  async def send(self, text: str) -> str:
    """Adds a user turn and runs the tool loop until the model answers without calls; returns that answer."""
    self.messages.append({"role": "user", "content": text})
    schemas = self.tools.schemas() if self.tools is not None else None
    reply: dict = {"content": ""}
    for _ in range(self.settings.max_turns):
      reply = await self.client.chat(self.messages, tools=schemas)
      self.messages.append(reply)
      if reply["content"]:
        self.say(f"assistant> {reply['content']}")
      items = sorted(reply.get("tool_calls", []) + reply.get("invalid_tool_calls", []), key=lambda c: c["index"])
      if not items or self.tools is None or self.client.last_finish_reason == "length":
        break
      outputs = [await self._answer(item) for item in items]
      outputs, _ = truncate_outputs(outputs, self.tokenizer, self.settings.max_observation_tokens)
      self.messages += [{"role": "tool", "content": out} for out in outputs]
    if self.client.last_finish_reason == "length":
      self.say("(reply cut at the token limit)")
    return reply.get("content", "")

  async def _answer(self, item: dict) -> str:
    if "error" in item:
      self.say(f"tool call error> {item['error']}")
      return item["error"]
    name, arguments = item["function"]["name"], json.loads(item["function"]["arguments"])
    self.say(f"tool call> {name}({_show_arguments(arguments)})")
    if self.settings.confirm and name in CODE_TOOLS and not _yes(self.ask(f"run {name}? [y/N] ")):
      self.say(f"tool result> {DECLINED}")
      return DECLINED
    try:
      result = await asyncio.wait_for(self.tools.call(name, arguments), self.settings.timeout_s)
      output = result.output
    except asyncio.TimeoutError:
      output = f"Error: {name} did not finish within {self.settings.timeout_s:g} s"
    self.say(f"tool result> {output}")
    return output

  def loop(self) -> None:
    """Reads lines until /exit or end of input."""
    self.say("commands: " + ", ".join(f"{c} ({what})" for c, what in COMMANDS.items()))
    try:
      while True:
        try:
          line = self.ask("you> ")
        except (EOFError, KeyboardInterrupt):
          return
        if not self.handle(line):
          return
    finally:
      self.close()


async def _cancel_all(tasks: set[asyncio.Task]) -> None:
  for task in tasks:
    task.cancel()
  await asyncio.gather(*tasks, return_exceptions=True)


def _yes(answer: str) -> bool:
  return answer.strip().lower() in ("y", "yes")


def _show_arguments(arguments: dict) -> str:
  if set(arguments) == {"code"} or set(arguments) == {"command"}:
    return "\n" + next(iter(arguments.values())).rstrip() + "\n"
  return ", ".join(f"{k}={v!r}" for k, v in arguments.items())


def is_hf_folder(path: str | os.PathLike) -> bool:
  """A Hugging Face `save_pretrained` folder (config.json plus safetensors), as opposed to an Orbax checkpoint."""
  p = Path(path)
  return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def load_model(path: str | os.PathLike, dtype: str | None = None) -> Any:
  """A Qwen3 from an Orbax checkpoint or a Hugging Face folder (detected from the files)."""
  if not Path(path).exists():
    raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} does not exist")
  if is_hf_folder(path):
    from retool_jax.models.qwen3 import load_hf  # noqa: PLC0415

    return load_hf(path, dtype=dtype)
  from retool_jax.checkpoint import load  # noqa: PLC0415

  return load(path, dtype=dtype)


def tokenizer_dir(checkpoint: str | os.PathLike | None, tokenizer: str | os.PathLike | None = None) -> Path:
  """`tokenizer` if given, else the checkpoint folder when it holds tokenizer files, else the bundled Qwen3 one."""
  if tokenizer is not None:
    return Path(tokenizer)
  if checkpoint is not None and any((Path(checkpoint) / f).is_file() for f in _TOKENIZER_FILES):
    return Path(checkpoint)
  from retool_jax.assets import QWEN3_TOKENIZER_DIR  # noqa: PLC0415

  return QWEN3_TOKENIZER_DIR


def make_engine(args: argparse.Namespace, tokenizer: Any) -> Any:
  if args.sglang_url:
    from retool_jax.rollout import SGLangEngine  # noqa: PLC0415

    return SGLangEngine(args.sglang_url)
  if not args.checkpoint:
    raise SystemExit("error: give --checkpoint (a model folder) or --sglang-url (a running server)")
  from retool_jax.rollout import JaxEngine  # noqa: PLC0415

  model = load_model(args.checkpoint, args.dtype)
  return JaxEngine(model, tokenizer=tokenizer, max_length=args.max_context, max_batch_size=1)


def make_tools(timeout_s: float) -> Any:
  """The built-in tools on a sandbox whose calls stop after `timeout_s`."""
  from retool_jax.sandbox import Limits, Sandbox  # noqa: PLC0415
  from retool_jax.tools import default_registry  # noqa: PLC0415

  sandbox: Sandbox | None = None

  def get_sandbox() -> Sandbox:
    nonlocal sandbox
    if sandbox is None:
      sandbox = Sandbox(limits=Limits(timeout_s=timeout_s), max_workers=1)
    return sandbox

  return default_registry(get_sandbox)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m retool_jax.chat", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", help="an Orbax checkpoint or a Hugging Face folder")
  p.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's, else the bundled Qwen3 one)")
  p.add_argument("--sglang-url", help="generate on this SGLang server instead of in-process")
  p.add_argument("--dtype", default=None, help="parameter / compute dtype, e.g. bfloat16 (default: checkpoint's)")
  p.add_argument("--no-confirm", action="store_true", help="run code without asking first")
  p.add_argument("--timeout", type=float, default=30.0, help="seconds a tool call may run")
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--top-p", type=float, default=0.95)
  p.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per model turn")
  p.add_argument("--max-context", type=int, default=8192, help="tokens in the whole conversation")
  p.add_argument("--no-thinking", action="store_true", help="ask the model not to think first")
  p.add_argument("--system", default=None, help="a system prompt")
  args = p.parse_args(argv)
  if args.timeout <= 0 or args.max_new_tokens < 1 or args.max_context < 2:
    p.error("--timeout, --max-new-tokens and --max-context must be positive")
  return args


def settings_from(args: argparse.Namespace) -> ChatSettings:
  return ChatSettings(
    temperature=args.temperature,
    top_p=args.top_p,
    max_new_tokens=args.max_new_tokens,
    max_context=args.max_context,
    enable_thinking=not args.no_thinking,
    confirm=not args.no_confirm,
    timeout_s=args.timeout,
    system=args.system,
  )


def main(
  argv: Sequence[str] | None = None,
  *,
  ask: Callable[[str], str] = input,
  say: Callable[[str], None] = print,
  engine: Any = None,
  tools: Any = None,
) -> None:
  """The chat command; `engine` / `tools` replace the ones the flags would build."""
  from retool_jax.chat.tokenizer import load_tokenizer  # noqa: PLC0415

  args = parse_args(argv)
  tokenizer = load_tokenizer(tokenizer_dir(args.checkpoint, args.tokenizer))
  engine = engine if engine is not None else make_engine(args, tokenizer)
  tools = tools if tools is not None else make_tools(args.timeout)
  session = ChatSession(engine, tokenizer, tools, settings_from(args), ask=ask, say=say)
  if args.sglang_url and hasattr(engine, "start"):
    session.run(engine.start())
  session.loop()
