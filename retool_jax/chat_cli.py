"""A terminal chat with tools over any engine, with the same turn handling as rollouts.

    python -m retool_jax.chat --checkpoint ckpt/qwen3-1.7b              # Orbax or Hugging Face folder
    python -m retool_jax.chat --checkpoint ckpt/qwen3-1.7b --sglang-url http://localhost:30000
    python -m retool_jax.chat --checkpoint runs/demo_cpu/rl/checkpoints  # what `make demo` trained

Prompts are rendered as the model was trained: the tokenizer, system prompt, tool schemas (or none), call and
observation formats and thinking come from the checkpoint's prompt contract (`prompt_contract.json` in the run
or export folder); flags override them. A tokenizer whose ids do not fit the model is refused before loading.

A conversation that outgrows the model's context loses its oldest whole turns (said once), so that a reply
still fits; `/reset` starts afresh. Every tool call and its result are shown. By default code-running tools ask before they run ("no" tells the
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

from retool_jax.assets import QWEN3_TOKENIZER_DIR
from retool_jax.chat.parse import FORMATS, CallError, ToolCall, parse_tool_calls
from retool_jax.chat.prompt_contract import (
  CONTRACT_FILE,
  OBSERVATION_FORMATS,
  ContractError,
  PromptContract,
  check_tokenizer_fits,
  contract_file,
  find_contract,
)
from retool_jax.chat.render import render_ids
from retool_jax.chat.tokenizer import IM_END, SpecialIds, load_tokenizer
from retool_jax.chat.trajectory import Trajectory
from retool_jax.checkpoint import load
from retool_jax.checkpoint.layout import read_config
from retool_jax.models.qwen3_hf import load_hf
from retool_jax.rollout import JaxEngine, SGLangEngine
from retool_jax.rollout.multiturn import MultiTurnConfig, stop_criteria, truncate_outputs
from retool_jax.rollout.types import GenerateRequest, SamplingParams
from retool_jax.sandbox import Limits, Sandbox
from retool_jax.tools import default_registry

CODE_TOOLS = frozenset({"code_interpreter", "execute_bash", "run_tests", "debug_code"})
DECLINED = "The user declined to run this tool call."
COMMANDS = {"/reset": "clear the conversation", "/tools": "list the tools", "/exit": "leave the chat"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_MAX_CONTEXT = 8192


@dataclasses.dataclass
class ChatSettings:
  """Sampling, limits and prompt format of a chat. `confirm`: ask before code-running tools; `timeout_s`: per
  tool call; `tools_in_prompt` .. `observation_format`: as in `PromptContract` (`settings_from` fills them in)."""

  temperature: float = 0.7
  top_p: float = 0.95
  max_new_tokens: int = 1024
  max_context: int = DEFAULT_MAX_CONTEXT
  max_turns: int = 8
  max_observation_tokens: int = 1024
  enable_thinking: bool = True
  confirm: bool = True
  timeout_s: float = 30.0
  system: str | None = None
  tools_in_prompt: bool = True
  call_formats: tuple[str, ...] = ("tool_call", "code")
  observation_format: str = "auto"

  def multiturn(self) -> MultiTurnConfig:
    return MultiTurnConfig(
      call_formats=tuple(self.call_formats),
      observation_format=self.observation_format,
      max_context=self.max_context,
      max_turns=self.max_turns,
      max_new_tokens=self.max_new_tokens,
      max_observation_tokens=self.max_observation_tokens,
      enable_thinking=self.enable_thinking,
      temperature=self.temperature,
      top_p=self.top_p,
    )


class ChatSession:
  """One conversation: user turns in, assistant replies and tool calls out (through `say`).

  The conversation is kept as token ids: what the model generated is never re-tokenised, and tool results are
  appended in the settings' observation format, exactly as rollouts append them. When the room left for a reply
  falls below `min(max_new_tokens, max_context // 2)`, the oldest whole turns (a user message and everything up
  to the next one) are cut from the ids, after the system prompt, as if they had never been sent.
  """

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
    self._im_start = SpecialIds.from_tokenizer(tokenizer).im_start
    self.dropped_turns = 0  # over the whole session, /reset included
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
    self.trajectory: Trajectory | None = None
    self.last_finish_reason: str | None = None
    self._head: int | None = None  # ids before the first user turn (system prompt, tools); None: cannot cut
    self._turns: list[tuple[int, int]] = []  # (first id, first message) of every user turn kept
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

  def _open(self, text: str) -> Trajectory:
    """The conversation's ids with the new user turn added and the assistant turn opened."""
    self.messages.append({"role": "user", "content": text})
    thinking = self.settings.enable_thinking
    if self.trajectory is None:
      schemas = self.tools.schemas() if self.tools is not None and self.settings.tools_in_prompt else None
      prompt = render_ids(self.tokenizer, self.messages, tools=schemas, enable_thinking=thinking)
      self.trajectory = Trajectory(self.tokenizer, prompt, enable_thinking=thinking)
      opened = [i for i, t in enumerate(prompt) if t == self._im_start]  # ..., the user turn, the assistant's
      start = opened[-2] if len(opened) >= 2 else len(prompt)
      self._head = start if len(opened) >= 2 else None
    else:
      before = len(self.trajectory)
      self.trajectory.add_user(text)
      start = self.trajectory.ids.index(self._im_start, before)
    self._turns.append((start, len(self.messages) - 1))
    return self.trajectory

  def _drop_oldest_turn(self, traj: Trajectory) -> bool:
    """Cuts the oldest whole turn (never the current one); False when there is none to cut."""
    if self._head is None or len(self._turns) < 2:
      return False
    (first_id, first_msg), (next_id, next_msg) = self._turns[:2]
    traj.drop(first_id, next_id)
    del self.messages[first_msg:next_msg]
    ids, msgs = next_id - first_id, next_msg - first_msg
    self._turns = [(i - ids, m - msgs) for i, m in self._turns[1:]]
    if not self.dropped_turns:
      self.say(
        f"(the oldest turns are dropped to keep the conversation within the model's {self.settings.max_context}"
        "-token context; /reset clears it)"
      )
    self.dropped_turns += 1
    return True

  async def send(self, text: str) -> str:
    """Adds a user turn and runs the tool loop until the model answers without calls; returns that answer."""
    traj = self._open(text)
    config = self.settings.multiturn()
    stops, stop_ids = stop_criteria(config, self.tokenizer)
    content = ""
    reserve = min(config.max_new_tokens or config.max_context, config.max_context // 2)
    for _ in range(self.settings.max_turns):
      while config.max_context - len(traj) < reserve and self._drop_oldest_turn(traj):
        pass
      room = config.max_context - len(traj)
      if room <= 0:
        self.say(f"(the conversation is {len(traj)} tokens; the context holds {config.max_context}: /reset)")
        self.last_finish_reason = None
        break
      sampling = SamplingParams(
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=min(room, config.max_new_tokens or room),
        stop=stops,
        stop_token_ids=stop_ids,
      )
      [result] = await self.engine.generate([GenerateRequest(tuple(traj.ids), sampling)])
      if result.finish_reason.type == "abort":
        raise RuntimeError(f"the engine aborted the request: {result.finish_reason.message}")
      traj.add_generated(result.output_ids, result.output_logprobs)
      self.last_finish_reason = result.finish_reason.type
      parsed = parse_tool_calls(self._text(result.output_ids), None, formats=config.call_formats)
      content = parsed.content
      if content:
        self.say(f"assistant> {content}")
      reply: dict[str, Any] = {"role": "assistant", "content": content}
      if parsed.calls:
        reply["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in parsed.calls]
      self.messages.append(reply)
      if not parsed.found or self.tools is None or self.last_finish_reason == "length":
        break
      outputs = [await self._answer(item) for item in parsed.items]
      outputs, _ = truncate_outputs(outputs, self.tokenizer, self.settings.max_observation_tokens)
      traj.add_tool_results(outputs, fmt=self._observation_format(parsed.items[-1].format, traj))
      self.messages += [{"role": "tool", "content": out} for out in outputs]
    if self.last_finish_reason == "length":
      self.say("(reply cut at the token limit)")
    return content

  def _text(self, ids: Sequence[int]) -> str:
    text = self.tokenizer.decode(list(ids))
    for marker in (IM_END, self.tokenizer.eos_token):
      if marker and text.endswith(marker):
        text = text[: -len(marker)]
    return text

  def _observation_format(self, call_format: str, traj: Trajectory) -> str:
    if traj.ends_turn:
      return "qwen"  # results after a closed turn are always a <tool_response> turn
    if self.settings.observation_format != "auto":
      return self.settings.observation_format
    return "qwen" if call_format == "tool_call" else "retool"

  async def _answer(self, item: ToolCall | CallError) -> str:
    if isinstance(item, CallError):
      self.say(f"tool call error> {item.message}")
      return item.message
    name, arguments = item.name, item.arguments
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
    return load_hf(path, dtype=dtype)
  return load(path, dtype=dtype)


def model_shape(path: str | os.PathLike) -> tuple[int, int]:
  """`(vocab_size, max_position_embeddings)` of a checkpoint, read from its config without loading weights."""
  if not Path(path).exists():
    raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} does not exist")
  if is_hf_folder(path):
    record = json.loads((Path(path) / "config.json").read_text())
    record = record.get("text_config", record)
  else:
    record = read_config(path)["model"]
  return int(record["vocab_size"]), int(record.get("max_position_embeddings") or DEFAULT_MAX_CONTEXT)


def tokenizer_dir(
  checkpoint: str | os.PathLike | None,
  tokenizer: str | os.PathLike | None = None,
  contract: PromptContract | None = None,
) -> Path:
  """`tokenizer` if given, else the contract's, else the checkpoint folder when it holds tokenizer files, else
  the bundled Qwen3 one."""
  if tokenizer is not None:
    return Path(tokenizer)
  if contract is not None:
    return contract.tokenizer_path()
  if checkpoint is not None and any((Path(checkpoint) / f).is_file() for f in _TOKENIZER_FILES):
    return Path(checkpoint)
  return QWEN3_TOKENIZER_DIR


def make_engine(args: argparse.Namespace, tokenizer: Any, max_context: int) -> Any:
  if args.sglang_url:
    return SGLangEngine(args.sglang_url)
  if not args.checkpoint:
    raise SystemExit("error: give --checkpoint (a model folder) or --sglang-url (a running server)")
  model = load_model(args.checkpoint, args.dtype)
  return JaxEngine(model, tokenizer=tokenizer, max_length=max_context, max_batch_size=1)


def make_tools(timeout_s: float) -> Any:
  """The built-in tools on a sandbox whose calls stop after `timeout_s`."""
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
  p.add_argument(
    "--tokenizer", help="tokenizer folder (default: the checkpoint's prompt contract, else its folder, else Qwen3)"
  )
  p.add_argument("--sglang-url", help="generate on this SGLang server instead of in-process")
  p.add_argument("--dtype", default=None, help="parameter / compute dtype, e.g. bfloat16 (default: checkpoint's)")
  p.add_argument("--no-confirm", action="store_true", help="run code without asking first")
  p.add_argument("--timeout", type=float, default=30.0, help="seconds a tool call may run")
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--top-p", type=float, default=0.95)
  p.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per model turn")
  p.add_argument(
    "--max-context",
    type=int,
    default=None,
    help=f"tokens in the whole conversation (default: the model's positions, at most {DEFAULT_MAX_CONTEXT})",
  )
  # The prompt format; each default comes from the checkpoint's prompt contract when it has one.
  p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None, help="let the model think")
  p.add_argument("--system", default=None, help="a system prompt")
  p.add_argument(
    "--tools-in-prompt",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="render the tool schemas into the system prompt",
  )
  p.add_argument("--call-formats", default=None, help=f"comma-separated tool-call formats, some of {FORMATS}")
  p.add_argument("--observation-format", default=None, choices=OBSERVATION_FORMATS, help="how results are shown")
  args = p.parse_args(argv)
  if args.timeout <= 0 or args.max_new_tokens < 1 or (args.max_context is not None and args.max_context < 2):
    p.error("--timeout, --max-new-tokens and --max-context must be positive")
  if args.call_formats is not None:
    args.call_formats = tuple(f.strip() for f in args.call_formats.split(",") if f.strip())
    unknown = sorted(set(args.call_formats) - set(FORMATS)) or ([] if args.call_formats else ["(none)"])
    if unknown:
      p.error(f"--call-formats: unknown format(s) {unknown}; expected some of {FORMATS}")
  return args


def settings_from(
  args: argparse.Namespace, contract: PromptContract | None = None, max_positions: int | None = None
) -> ChatSettings:
  """The chat's settings: flags first, then the prompt contract, then the defaults."""
  base = contract or PromptContract(tokenizer=".")

  def pick(flag: Any, recorded: Any) -> Any:
    return recorded if flag is None else flag

  max_context = args.max_context or min(DEFAULT_MAX_CONTEXT, max_positions or DEFAULT_MAX_CONTEXT)
  return ChatSettings(
    temperature=args.temperature,
    top_p=args.top_p,
    max_new_tokens=args.max_new_tokens,
    max_context=max_context,
    enable_thinking=pick(args.thinking, base.enable_thinking),
    confirm=not args.no_confirm,
    timeout_s=args.timeout,
    system=pick(args.system, base.system_prompt),
    tools_in_prompt=pick(args.tools_in_prompt, base.tools_in_prompt),
    call_formats=tuple(pick(args.call_formats, base.call_formats)),
    observation_format=pick(args.observation_format, base.observation_format),
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
  args = parse_args(argv)
  contract = find_contract(args.checkpoint) if args.checkpoint else None
  if contract is not None:
    say(f"prompt contract {contract_file(args.checkpoint)}: {contract.describe()}")
  elif args.checkpoint:
    say(f"(no {CONTRACT_FILE} with {args.checkpoint}: Qwen3 prompt defaults, tool schemas in the prompt)")
  tok_dir = tokenizer_dir(args.checkpoint, args.tokenizer, contract)
  tokenizer = load_tokenizer(tok_dir)
  max_positions = None
  if args.checkpoint:
    vocab_size, max_positions = model_shape(args.checkpoint)
    check_tokenizer_fits(tokenizer, vocab_size, tokenizer_name=os.fspath(tok_dir), model_name=args.checkpoint)
  settings = settings_from(args, contract, max_positions)
  engine = engine if engine is not None else make_engine(args, tokenizer, settings.max_context)
  tools = tools if tools is not None else make_tools(args.timeout)
  session = ChatSession(engine, tokenizer, tools, settings, ask=ask, say=say)
  if args.sglang_url and hasattr(engine, "start"):
    session.run(engine.start())
  session.loop()


def run(argv: Sequence[str] | None = None) -> None:
  """`python -m retool_jax.chat`: `main`, with a bad checkpoint, tokenizer or contract reported in one line."""
  try:
    main(argv)
  except (ContractError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
