"""Agentic rollouts: an agent written against chat messages, recorded token by token.

    async def my_agent(client, prompt, tools):
        messages = [{"role": "user", "content": prompt}]
        reply = await client.chat(messages, tools=tools.schemas())       # {"role": "assistant", ...}
        ...
    rollouts = await run_agent(engine, "my_pkg.agents:my_agent", prompts, tools, config)

`ChatClient.chat` renders only what is new: when `messages` extends the conversation of the previous call (its
messages plus the reply it returned), the previous ids are reused as they are and only the new environment
messages (tool results, user turns) are tokenised, exactly as the Qwen3 template renders them. The ids used for
training are therefore the ids the engine saw and produced; re-rendering the history through the template (which
drops earlier `<think>` blocks, for one) never happens. A call whose messages do not extend the last
conversation starts a new recorded segment.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from retool_jax.chat import check_messages, parse_tool_calls, render_ids, tool_schemas
from retool_jax.chat.observation import assistant_header
from retool_jax.chat.parse import ToolCall
from retool_jax.chat.tokenizer import IM_END, IM_START, TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN, encode_text
from retool_jax.rollout.multiturn import (
  MultiTurnConfig,
  Rollout,
  TurnStats,
  default_tokenizer,
  open_tools,
  trajectory_budget,
)
from retool_jax.rollout.types import Engine, GenerateRequest, GenerateResult, SamplingParams

__all__ = [
  "AgentRollout",
  "ChatClient",
  "environment_text",
  "forced_prefix",
  "load_agent",
  "render_key",
  "run_agent",
]

Agent = Callable[..., Any]


def environment_text(messages: Sequence[Mapping[str, Any]], *, after_im_end: bool, enable_thinking: bool) -> str:
  """Tool / user / system messages after an assistant turn, as the Qwen3 template renders them, ending with
  the next assistant header. Consecutive tool messages share one user turn."""
  parts = ["\n" if after_im_end else f"{IM_END}\n"]
  for i, m in enumerate(messages):
    role, content = m.get("role"), m.get("content") or ""
    if role == "tool":
      opens = i == 0 or messages[i - 1].get("role") != "tool"
      closes = i == len(messages) - 1 or messages[i + 1].get("role") != "tool"
      parts.append(
        (f"{IM_START}user" if opens else "")
        + f"\n{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"
        + (f"{IM_END}\n" if closes else "")
      )
    elif role in ("user", "system"):
      parts.append(f"{IM_START}{role}\n{content}{IM_END}\n")
    else:
      raise ValueError(f"messages after an assistant reply must be tool, user or system messages; got {role!r}")
  return "".join(parts) + assistant_header(enable_thinking)


def render_key(message: Mapping[str, Any]) -> tuple:
  """What of a message reaches the prompt: its role, text and calls (arguments as values, so a JSON string and
  the dict it encodes are the same call). Extra fields a client sends back (`refusal`, `annotations`, ...) and
  call ids do not count."""
  calls = []
  for call in message.get("tool_calls") or ():
    fn = call.get("function", call)
    args = fn.get("arguments")
    if isinstance(args, str):
      try:
        args = json.loads(args)
      except ValueError:
        pass
    calls.append((fn.get("name"), json.dumps(args, sort_keys=True, ensure_ascii=False)))
  return message.get("role"), message.get("content") or "", tuple(calls)


def forced_prefix(tool_choice: str | Mapping[str, Any] | None) -> str:
  """The text a reply is made to start with for an OpenAI `tool_choice` (hermes `<tool_call>` format)."""
  if tool_choice in (None, "auto", "none"):
    return ""
  if tool_choice == "required":
    return "<tool_call>\n"
  if isinstance(tool_choice, Mapping) and isinstance(tool_choice.get("function"), Mapping):
    name = tool_choice["function"].get("name")
    if isinstance(name, str) and name:
      return f'<tool_call>\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '
  raise ValueError(
    f"tool_choice {tool_choice!r} must be 'auto', 'none', 'required' or "
    '{"type": "function", "function": {"name": ...}}'
  )


@dataclasses.dataclass
class _Segment:
  messages: list[dict]
  tools: Any
  ids: list[int]
  loss_mask: list[int]
  logprobs: list[float]
  num_prompt_tokens: int
  turns: list[TurnStats] = dataclasses.field(default_factory=list)
  versions: list[Any] = dataclasses.field(default_factory=list)
  truncated: bool = False


class ChatClient:
  """The chat interface an agent calls; records every call token-exactly (see the module docstring)."""

  def __init__(self, engine: Engine, tokenizer: Any, config: MultiTurnConfig, *, seed: int | None = None):
    self.engine = engine
    self.tokenizer = tokenizer
    self.config = config
    self.seed = seed
    self.segments: list[_Segment] = []
    self.last_finish_reason: str | None = None
    self._stop_ids = tuple(
      dict.fromkeys([tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id, *config.stop_token_ids])
    )
    self._calls = 0
    self.last_result: GenerateResult | None = None
    self.last_prompt_tokens = 0

  async def chat(
    self,
    messages: Sequence[Mapping[str, Any]],
    tools: Any = None,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    include_stop_str: bool = True,
    on_tokens: Callable[[list[int], list[float]], Any] | None = None,
  ) -> dict:
    """The assistant's reply: `{"role": "assistant", "content": str, "tool_calls": [...]}`.

    `tool_calls` follow the OpenAI shape (`{"id", "type": "function", "function": {"name", "arguments": JSON}}`)
    plus `index`, the call's position in the text; calls that could not be parsed come back in
    `invalid_tool_calls` as `{"index", "error"}` so the agent can answer them. `last_finish_reason` tells why
    generation ended (`stop` or `length`); `last_result` is the engine's result (ids, log-probs).

    `seed` replaces this call's derived seed. `tool_choice` (OpenAI's): `"auto"` / None parses calls; `"none"`
    returns the text as content, unparsed; `"required"` or `{"type": "function", "function": {"name": N}}`
    opens the reply with `<tool_call>` (and the call's name), tokens recorded with loss mask 0 as they were not
    sampled. `include_stop_str=False` drops a matched stop string from the content (the ids keep it).
    `on_tokens(ids, logprobs)` is told the reply's tokens as they come (the engine's `generate_stream` where it
    has one, else all at once).
    """
    check_messages(messages)
    seg = self._segment_for(messages, tool_schemas(tools))
    self.last_result = None
    forced = forced_prefix(tool_choice)
    forced_ids = encode_text(self.tokenizer, forced) if forced else []
    limit, _ = trajectory_budget(self.config, seg.num_prompt_tokens)
    room = limit - len(seg.ids) - len(forced_ids)
    if room <= 0 or seg.truncated:
      seg.truncated, self.last_finish_reason = True, "length"
      return self._remember(seg, messages, {"role": "assistant", "content": ""})
    seg.ids += forced_ids
    seg.loss_mask += [0] * len(forced_ids)
    seg.logprobs += [0.0] * len(forced_ids)
    self.last_prompt_tokens = len(seg.ids)
    cfg = self.config
    cap = max_tokens or cfg.max_new_tokens or room
    sampling = SamplingParams(
      temperature=cfg.temperature if temperature is None else temperature,
      top_p=cfg.top_p if top_p is None else top_p,
      top_k=cfg.top_k if top_k is None else top_k,
      max_new_tokens=min(room, cap),
      stop=tuple(cfg.stop) + tuple(stop),
      stop_token_ids=self._stop_ids,
      seed=seed if seed is not None else None if self.seed is None else self.seed + self._calls,
    )
    self._calls += 1
    result = await self._generate(GenerateRequest(tuple(seg.ids), sampling), on_tokens)
    if result.finish_reason.type == "abort":
      raise RuntimeError(f"the engine aborted the request: {result.finish_reason.message}")
    self.last_result = result
    seg.ids += result.output_ids
    seg.loss_mask += [1] * len(result.output_ids)
    seg.logprobs += list(result.output_logprobs)
    seg.turns.append(TurnStats(len(result.output_ids), result.finish_reason.type))
    seg.versions.append(result.weight_version)
    self.last_finish_reason = result.finish_reason.type
    if result.finish_reason.type == "length" and (
      len(seg.ids) >= limit or len(result.output_ids) < sampling.max_new_tokens
    ):
      seg.truncated = True  # the budget, or the engine's own context length, is used up
    matched = result.finish_reason.matched if result.finish_reason.type == "stop" else None
    drop = matched if isinstance(matched, str) and not include_stop_str else None
    reply = self._reply(forced_ids + result.output_ids, parse=tool_choice != "none", drop_suffix=drop)
    return self._remember(seg, messages, reply)

  def record_tool_stats(self, calls: int, errors: int, seconds: float) -> None:
    """Lets the agent attach tool statistics to the last turn (shown in the rollout's per-turn stats)."""
    if self.segments and self.segments[-1].turns:
      turn = self.segments[-1].turns[-1]
      turn.tool_calls += calls
      turn.tool_errors += errors
      turn.tool_time_s += seconds

  # ---- internals ---------------------------------------------------------------------------------

  async def _generate(self, request: GenerateRequest, on_tokens) -> GenerateResult:
    if on_tokens is None:
      [result] = await self.engine.generate([request])
      return result
    if not hasattr(self.engine, "generate_stream"):
      [result] = await self.engine.generate([request])
      on_tokens(list(result.output_ids), list(result.output_logprobs))
      return result
    async for item in self.engine.generate_stream(request):
      if isinstance(item, GenerateResult):
        return item
      on_tokens(*item)
    raise RuntimeError("the engine's stream ended without a result")

  def _segment_for(self, messages: Sequence[Mapping[str, Any]], tools: Any) -> _Segment:
    seg = self.segments[-1] if self.segments else None
    n = len(seg.messages) if seg else 0
    if (
      seg is not None
      and seg.tools == tools
      and len(messages) > n
      and [render_key(m) for m in messages[:n]] == [render_key(m) for m in seg.messages]
      and all(m.get("role") != "assistant" for m in messages[n:])
    ):
      text = environment_text(
        messages[n:], after_im_end=seg.ids[-1] in self._stop_ids, enable_thinking=self.config.enable_thinking
      )
      ids = encode_text(self.tokenizer, text)
      seg.ids += ids
      seg.loss_mask += [0] * len(ids)
      seg.logprobs += [0.0] * len(ids)
      if seg.turns:
        seg.turns[-1].observation_tokens += len(ids)
      return seg
    ids = render_ids(self.tokenizer, messages, tools=tools, enable_thinking=self.config.enable_thinking)
    seg = _Segment([], tools, ids, [0] * len(ids), [0.0] * len(ids), len(ids))
    self.segments.append(seg)
    return seg

  def _remember(self, seg: _Segment, messages, reply: dict) -> dict:
    seg.messages = [copy.deepcopy(dict(m)) for m in messages] + [copy.deepcopy(reply)]
    return reply

  def _reply(self, output_ids: list[int], *, parse: bool = True, drop_suffix: str | None = None) -> dict:
    text = self.tokenizer.decode(output_ids)
    for marker in (IM_END, self.tokenizer.eos_token):
      if marker and text.endswith(marker):
        text = text[: -len(marker)]
    if not parse:
      content = text[: -len(drop_suffix)] if drop_suffix and text.endswith(drop_suffix) else text
      return {"role": "assistant", "content": content}
    parsed = parse_tool_calls(text, None, formats=self.config.call_formats)
    content = parsed.content
    if drop_suffix and content.endswith(drop_suffix):
      content = content[: -len(drop_suffix)]
    reply: dict[str, Any] = {"role": "assistant", "content": content}
    calls, invalid = [], []
    for i, item in enumerate(parsed.items):
      if isinstance(item, ToolCall):
        calls.append(
          {
            "id": f"call_{self._calls}_{i}",
            "type": "function",
            "index": i,
            "function": {"name": item.name, "arguments": json.dumps(item.arguments, ensure_ascii=False)},
          }
        )
      else:
        invalid.append({"index": i, "error": item.message})
    if calls:
      reply["tool_calls"] = calls
    if invalid:
      reply["invalid_tool_calls"] = invalid
    return reply


@dataclasses.dataclass
class AgentRollout:
  """Everything one agent run produced: its recorded segments (usually one) and what the agent returned."""

  segments: list[Rollout]
  output: Any
  status: str  # completed | truncated | aborted
  error: str | None = None

  @property
  def rollout(self) -> Rollout:
    """The last segment (the whole conversation when the agent only ever extended it)."""
    return self.segments[-1]


def load_agent(spec: str | Agent) -> Agent:
  """An agent function from `module:function` (or the function itself)."""
  if callable(spec):
    return spec
  if not isinstance(spec, str) or spec.count(":") != 1:
    raise ValueError(f"agent {spec!r} must be a callable or 'module:function'")
  module_name, name = spec.split(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"agent {spec!r}: cannot import module {module_name!r} ({e})") from None
  fn = getattr(module, name, None)
  if not callable(fn):
    raise ValueError(f"agent {spec!r}: module {module_name!r} has no function {name!r}")
  return fn


async def run_agent(
  engine: Engine,
  agent: str | Agent,
  prompts: Sequence[Any],
  tools: Any = None,
  config: MultiTurnConfig | Any = None,
  *,
  tokenizer: Any = None,
  client_for: Callable[[int, ChatClient], Any] | None = None,
) -> list[AgentRollout]:
  """Runs `agent(client, prompt, tools)` once per prompt, concurrently; results are in prompt order.

  The agent of prompt `i` gets `client_for(i, chat_client)` when given (e.g. an OpenAI client on a server
  session recorded by `chat_client`), else the `ChatClient` itself.

  `tools` is what `generate_multiturn` takes (a registry, None, or a per-trajectory factory); the agent gets
  the registry. The config supplies sampling defaults, `max_context` and the limits the agent may read from
  `client.config`.
  """
  fn = load_agent(agent)
  config = MultiTurnConfig.from_any(config)
  tokenizer = tokenizer or default_tokenizer(engine)

  async def one(i: int, prompt: Any) -> AgentRollout:
    client = ChatClient(engine, tokenizer, config, seed=None if config.seed is None else config.seed + 1000 * i)
    error, output = None, None
    async with open_tools(tools) as registry:
      try:
        output = await fn(client if client_for is None else client_for(i, client), prompt, registry)
      except Exception as e:  # noqa: BLE001  (one failing agent aborts its own rollout only)
        error = f"{type(e).__name__}: {e}"
    segments = [_as_rollout(s, tokenizer, config) for s in client.segments]
    status = "aborted" if error else "truncated" if any(s.truncated for s in client.segments) else "completed"
    return AgentRollout(segments, output, status, error)

  return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def _as_rollout(seg: _Segment, tokenizer, config: MultiTurnConfig) -> Rollout:
  limit, limit_reason = trajectory_budget(config, seg.num_prompt_tokens)
  n = min(len(seg.ids), limit)
  status = "truncated" if seg.truncated or len(seg.ids) > limit else "completed"
  return Rollout(
    seg.ids[:n],
    seg.loss_mask[:n],
    seg.logprobs[:n],
    seg.num_prompt_tokens,
    status,
    limit_reason if status == "truncated" else "agent",
    seg.turns,
    tokenizer.decode(seg.ids[seg.num_prompt_tokens : n]),
    seg.versions,
  )
