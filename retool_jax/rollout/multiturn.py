"""The ReTool loop: generate until a tool call closes, run the tools, append the observation, continue.

    results = await generate_multiturn(engine, prompts, default_registry(), MultiTurnConfig(max_context=8192))
    results[0].ids, results[0].loss_mask, results[0].logprobs, results[0].status, results[0].text

Every trajectory is its own asyncio task: its generation requests go to the engine (which batches them with the
other trajectories') and its tool calls run while the others keep generating, so a slow tool never stalls the
batch. Generated ids are kept exactly as the engine produced them (loss-mask 1, with their log-probs);
observations are tokenised on their own (loss-mask 0, log-prob 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from retool_jax.assets import QWEN3_TOKENIZER_DIR
from retool_jax.chat import Trajectory, load_tokenizer, parse_tool_calls, render_ids
from retool_jax.chat.parse import FORMATS, CallError
from retool_jax.chat.tokenizer import encode_text
from retool_jax.fields import dataclass_kwargs
from retool_jax.rollout.types import Engine, GenerateRequest, SamplingParams
from retool_jax.sandbox import default_sandbox
from retool_jax.tools import default_registry

__all__ = [
  "MultiTurnConfig",
  "Rollout",
  "TurnStats",
  "generate_multiturn",
  "open_tools",
  "run_tool_calls",
  "session_tools",
  "stop_criteria",
  "trajectory_budget",
  "truncate_outputs",
]

STATUSES = ("completed", "truncated", "aborted")
# auto: `<interpreter>` inline after a `<code>` call (ReTool), a `<tool_response>` turn after `<tool_call>`.
OBSERVATION_FORMATS = ("auto", "qwen", "retool")
CODE_CLOSE = "</code>"
TRUNCATION_NOTE = "\n... [output truncated]"


@dataclasses.dataclass(frozen=True)
class MultiTurnConfig:
  """Limits and sampling of a multi-turn rollout.

  `max_context` bounds the whole trajectory (prompt + every turn + every observation); an engine whose own
  context is shorter ends the trajectory `truncated` when it cuts a turn. `max_response_tokens` (None: no cap
  of its own) bounds what follows the prompt (every turn + every observation), the "response length" of RL
  recipes; a trajectory ends at whichever of the two comes first. `max_new_tokens` caps one
  generation call (None: whatever is left of `max_context`). An observation longer than
  `max_observation_tokens` keeps its head and says it was cut. The retool format cannot follow a closed
  turn (`<|im_end|>`); tool results after one are always a `<tool_response>` turn.
  """

  max_context: int = 8192
  max_turns: int = 16
  max_tool_calls: int = 16
  max_response_tokens: int | None = None
  max_new_tokens: int | None = None
  max_observation_tokens: int = 1024
  observation_format: str = "auto"  # "auto", "qwen" (<tool_response> turn), "retool" (<interpreter>)
  call_formats: tuple[str, ...] = ("tool_call", "code")
  enable_thinking: bool = True
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = -1
  seed: int | None = None  # trajectory i, turn t samples with seed + 1000 * i + t
  stop: tuple[str, ...] = ()  # added to the format's own stops
  stop_token_ids: tuple[int, ...] = ()
  weight_version: int | str | None = None  # pin every turn to this held version (`GenerateRequest`)
  follow_updates: bool = False  # every turn moves onto newer weights as they arrive (a partial rollout)

  def __post_init__(self):
    for name in ("max_context", "max_turns", "max_observation_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"MultiTurnConfig.{name}={getattr(self, name)} must be >= 1")
    if self.max_tool_calls < 0:
      raise ValueError(f"MultiTurnConfig.max_tool_calls={self.max_tool_calls} must be >= 0")
    for name in ("max_new_tokens", "max_response_tokens"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"MultiTurnConfig.{name}={getattr(self, name)} must be >= 1 or None")
    if self.observation_format not in OBSERVATION_FORMATS:
      raise ValueError(
        f"MultiTurnConfig.observation_format={self.observation_format!r}; expected one of {OBSERVATION_FORMATS}"
      )
    unknown = set(self.call_formats) - set(FORMATS)
    if unknown:
      raise ValueError(
        f"MultiTurnConfig.call_formats has unknown formats {sorted(unknown)}; expected some of {FORMATS}"
      )
    SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)  # same checks

  @classmethod
  def from_config(cls, config: Any) -> MultiTurnConfig:
    """From an `ml_collections.ConfigDict` (or any mapping) with a subset of the fields; unknown keys are errors."""
    values = dataclass_kwargs(cls, config, "multi-turn config (rollout)")
    for key in ("call_formats", "stop", "stop_token_ids"):
      if key in values:
        values[key] = tuple(values[key])
    return cls(**values)

  @classmethod
  def from_any(cls, config: Any) -> MultiTurnConfig:
    """None (the defaults), a `MultiTurnConfig`, or what `from_config` takes."""
    if config is None:
      return cls()
    return config if isinstance(config, cls) else cls.from_config(config)


@dataclasses.dataclass
class TurnStats:
  """One generation call and the tool calls that followed it."""

  generated_tokens: int
  finish_reason: str
  tool_calls: int = 0
  tool_errors: int = 0
  tool_time_s: float = 0.0
  observation_tokens: int = 0
  observation_truncated: bool = False


@dataclasses.dataclass
class Rollout:
  """One trajectory, token-exact: `ids`, `loss_mask` (1 on generated tokens) and `logprobs` are aligned."""

  ids: list[int]
  loss_mask: list[int]
  logprobs: list[float]
  num_prompt_tokens: int
  status: str  # completed | truncated | aborted
  stop_reason: str  # eos, stop, max_context, max_response_tokens, max_turns, max_tool_calls, or an abort message
  turns: list[TurnStats]
  text: str  # the response (everything after the prompt), for the reward
  weight_versions: list[Any] = dataclasses.field(default_factory=list)  # the version each turn started on
  token_versions: list[Any] = dataclasses.field(default_factory=list)  # the version of each generated token

  @property
  def response_ids(self) -> list[int]:
    return self.ids[self.num_prompt_tokens :]

  @property
  def tool_calls(self) -> int:
    return sum(t.tool_calls for t in self.turns)

  @property
  def tool_errors(self) -> int:
    return sum(t.tool_errors for t in self.turns)

  @property
  def tool_time_s(self) -> float:
    return sum(t.tool_time_s for t in self.turns)


def stop_criteria(config: MultiTurnConfig, tokenizer: Any) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Stop strings and stop token ids of a turn: the end of a call in either format, and the end of the turn."""
  stops = tuple(config.stop) + ((CODE_CLOSE,) if "code" in config.call_formats else ())
  ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
  if "tool_call" in config.call_formats:
    ids.append(tokenizer.convert_tokens_to_ids("</tool_call>"))
  ids += config.stop_token_ids
  return tuple(dict.fromkeys(stops)), tuple(dict.fromkeys(int(i) for i in ids if i is not None))


async def run_tool_calls(parsed: Any, registry: Any) -> tuple[list[str], int]:
  """Outputs of a turn's parsed calls in text order (run concurrently) and how many failed.

  Unparseable calls answer with their error message; `registry.call` never raises.
  """

  async def one(item: Any) -> tuple[str, bool]:
    if isinstance(item, CallError):
      return item.message, False
    result = await registry.call(item.name, item.arguments)
    return result.output, bool(result.ok)

  done = await asyncio.gather(*(one(item) for item in parsed.items))
  return [out for out, _ in done], sum(not ok for _, ok in done)


def session_tools(sandbox: Any) -> Callable[[], contextlib.AbstractAsyncContextManager]:
  """A `tools` factory giving every trajectory its own persistent interpreter session (closed at its end)."""

  @contextlib.asynccontextmanager
  async def per_trajectory():
    session = sandbox.session()
    try:
      yield default_registry(sandbox=session)
    finally:
      await session.aclose()

  return per_trajectory


# How a run's trajectories get their tools: a sandboxed interpreter session each (state kept between its calls),
# every call in a fresh sandboxed interpreter (no session start-up per trajectory), or no tools.
TOOL_MODES = ("interpreter", "interpreter_stateless", "none")


def tools_for(mode: str, sandbox: Any = None) -> Any:
  """The `tools` argument of `generate_multiturn` for a run's `tools` setting (one of `TOOL_MODES`)."""
  if mode not in TOOL_MODES:
    raise ValueError(f"tools={mode!r}; expected one of {TOOL_MODES}")
  if mode == "none":
    return None
  if mode == "interpreter_stateless":
    return default_registry(sandbox=sandbox) if sandbox is not None else default_registry()
  return session_tools(sandbox if sandbox is not None else default_sandbox())


async def generate_multiturn(
  engine: Engine,
  prompts: Sequence[Any],
  tools: Any,
  config: MultiTurnConfig | Any = None,
  *,
  tokenizer: Any = None,
) -> list[Rollout]:
  """Rolls out every prompt with tool calls; results are in prompt order.

  Args:
    engine: any `Engine` (the embedded `JaxEngine` or an `SGLangEngine`).
    prompts: token ids (already rendered) or chat message lists (rendered here with the tools' schemas).
    tools: a tool registry (`.call`, `.get`, `.schemas`), None for no tools, or a zero-argument factory that
      returns a registry or an async context manager yielding one, per trajectory (e.g. `session_tools`).
    config: a `MultiTurnConfig`, a `ConfigDict` / mapping of its fields, or None for the defaults.
    tokenizer: the policy's tokenizer (default: the engine's, else the bundled Qwen3 tokenizer).
  """
  config = MultiTurnConfig.from_any(config)
  tokenizer = tokenizer or default_tokenizer(engine)
  return list(
    await asyncio.gather(
      *(_one_trajectory(engine, prompt, tools, config, tokenizer, i) for i, prompt in enumerate(prompts))
    )
  )


def default_tokenizer(engine: Any) -> Any:
  """The engine's tokenizer when it has one, else the bundled Qwen3 tokenizer."""
  tokenizer = getattr(engine, "tokenizer", None)
  if tokenizer is not None:
    return tokenizer
  return load_tokenizer(QWEN3_TOKENIZER_DIR)


async def _one_trajectory(engine, prompt, tools, config: MultiTurnConfig, tokenizer, index: int) -> Rollout:
  async with open_tools(tools) as registry:
    prompt_ids = _prompt_ids(prompt, registry, config, tokenizer, index)
    traj = Trajectory(tokenizer, prompt_ids, enable_thinking=config.enable_thinking)
    turns: list[TurnStats] = []
    versions: list[Any] = []
    token_versions: list[Any] = []
    status, reason = await _loop(
      engine, registry, config, tokenizer, traj, turns, (versions, token_versions), index
    )
  ids, mask, logprobs = traj.ids, traj.loss_mask, traj.logprobs
  limit, _ = trajectory_budget(config, traj.num_prompt_tokens)
  if len(ids) > limit:  # an observation overflowed the budget: keep exactly the budget's tokens
    ids, mask, logprobs = ids[:limit], mask[:limit], logprobs[:limit]
  return Rollout(
    ids,
    mask,
    logprobs,
    traj.num_prompt_tokens,
    status,
    reason,
    turns,
    tokenizer.decode(ids[traj.num_prompt_tokens :]),
    versions,
    token_versions[: int(sum(mask))],
  )


async def _loop(
  engine,
  registry,
  config: MultiTurnConfig,
  tokenizer,
  traj: Trajectory,
  turns: list[TurnStats],
  versions: tuple[list[Any], list[Any]],
  index: int,
) -> tuple[str, str]:
  stops, stop_ids = stop_criteria(config, tokenizer)
  limit, limit_reason = trajectory_budget(config, traj.num_prompt_tokens)
  if len(traj) >= limit:
    return "truncated", limit_reason
  segment = len(traj)  # where the policy's current stretch of text began (calls are parsed over all of it)
  while True:
    if len(turns) >= config.max_turns:
      return "truncated", "max_turns"
    room = limit - len(traj)
    sampling = SamplingParams(
      temperature=config.temperature,
      top_p=config.top_p,
      top_k=config.top_k,
      stop=stops,
      stop_token_ids=stop_ids,
      max_new_tokens=min(room, config.max_new_tokens or room),
      seed=None if config.seed is None else config.seed + 1000 * index + len(turns),
    )
    try:
      request = GenerateRequest(
        tuple(traj.ids),
        sampling,
        f"{index}-{len(turns)}",
        weight_version=config.weight_version,
        follow_updates=config.follow_updates,
      )
      [result] = await engine.generate([request])
    except Exception as e:  # noqa: BLE001  (one failed request aborts its trajectory, not the batch)
      return "aborted", f"engine error: {type(e).__name__}: {e}"
    versions[0].append(result.weight_version)
    versions[1].extend(result.token_versions())
    traj.add_generated(result.output_ids, result.output_logprobs)
    finish = result.finish_reason
    turn = TurnStats(len(result.output_ids), finish.type)
    turns.append(turn)
    if finish.type == "abort":
      return "aborted", finish.message or "engine aborted the request"
    if len(traj) >= limit:
      return "truncated", limit_reason
    if finish.type == "length":
      if len(result.output_ids) < sampling.max_new_tokens:
        return "truncated", "max_context"  # the engine's own context length ended the turn early
      continue  # the per-call cap cut the text: keep generating it
    parsed = parse_tool_calls(tokenizer.decode(traj.ids[segment:]), registry, formats=config.call_formats)
    if registry is None or not parsed.found:
      return "completed", "eos" if finish.matched in (tokenizer.eos_token_id, _im_end(tokenizer)) else "stop"
    made = sum(t.tool_calls for t in turns)
    if made + len(parsed.items) > config.max_tool_calls:
      return "truncated", "max_tool_calls"
    start = time.perf_counter()
    outputs, errors = await run_tool_calls(parsed, registry)
    turn.tool_time_s = time.perf_counter() - start
    turn.tool_calls, turn.tool_errors = len(parsed.items), errors
    outputs, turn.observation_truncated = truncate_outputs(outputs, tokenizer, config.max_observation_tokens)
    added = traj.add_tool_results(outputs, fmt=_observation_format(config, parsed, traj))
    turn.observation_tokens = len(added)
    segment = len(traj)
    if len(traj) >= limit:
      return "truncated", limit_reason


def trajectory_budget(config: MultiTurnConfig, num_prompt_tokens: int) -> tuple[int, str]:
  """The trajectory's length limit, and the stop reason when it is reached."""
  if (
    config.max_response_tokens is not None and num_prompt_tokens + config.max_response_tokens < config.max_context
  ):
    return num_prompt_tokens + config.max_response_tokens, "max_response_tokens"
  return config.max_context, "max_context"


def _observation_format(config: MultiTurnConfig, parsed: Any, traj: Trajectory) -> str:
  if traj.ends_turn:
    return "qwen"
  if config.observation_format != "auto":
    return config.observation_format
  return "qwen" if parsed.items[-1].format == "tool_call" else "retool"


def _im_end(tokenizer) -> int:
  return tokenizer.convert_tokens_to_ids("<|im_end|>")


def truncate_outputs(outputs: list[str], tokenizer, limit: int) -> tuple[list[str], bool]:
  """Cuts every output to `limit` tokens (with a note saying so); also says whether any was cut."""
  cut = False
  kept = []
  for text in outputs:
    ids = encode_text(tokenizer, text)
    if len(ids) > limit:
      text, cut = tokenizer.decode(ids[:limit]) + TRUNCATION_NOTE, True
    kept.append(text)
  return kept, cut


def _prompt_ids(prompt: Any, registry: Any, config: MultiTurnConfig, tokenizer, index: int) -> list[int]:
  if isinstance(prompt, str):
    raise TypeError(f"prompts[{index}] is a string; pass token ids or a list of chat messages")
  items = list(prompt)
  if not items:
    raise ValueError(f"prompts[{index}] is empty")
  if all(isinstance(m, Mapping) for m in items):
    schemas = registry.schemas() if registry is not None and hasattr(registry, "schemas") else None
    return render_ids(tokenizer, items, tools=schemas, enable_thinking=config.enable_thinking)
  if all(isinstance(t, int) for t in items):
    return items
  raise TypeError(f"prompts[{index}] must be token ids or chat messages (dicts)")


@contextlib.asynccontextmanager
async def open_tools(tools: Any):
  """The registry one trajectory uses: `tools` itself, or what a per-trajectory factory makes (and closes)."""
  if tools is None or hasattr(tools, "call"):
    yield tools
    return
  if not callable(tools):
    raise TypeError(f"tools must be a registry, None or a factory, got {type(tools).__name__}")
  made = tools()
  if hasattr(made, "__aenter__"):
    async with made as registry:
      yield registry
  else:
    yield made
