"""The ReTool agent: reason, call the interpreter, read its output, repeat until an answer.

rollouts = await run_agent(engine, "retool_jax.rollout.agents.retool:retool_agent", questions, tools, config)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

from retool_jax.rollout.multiturn import CODE_CLOSE, truncate_outputs

DEFAULT_INSTRUCTION = (
  "Solve the problem. You may run Python with the code_interpreter tool as often as you "
  "need. Put the final answer in \\boxed{}."
)


def _messages(prompt: Any) -> list[dict]:
  if isinstance(prompt, str):
    return [{"role": "user", "content": f"{prompt}\n\n{DEFAULT_INSTRUCTION}"}]
  if isinstance(prompt, Mapping):
    for key in ("messages", "prompt", "question", "problem"):
      if key in prompt:
        return _messages(prompt[key])
    raise ValueError(f"prompt dict has none of the keys messages / prompt / question / problem: {sorted(prompt)}")
  return [dict(m) for m in prompt]


async def retool_agent(client: Any, prompt: Any, tools: Any) -> str:
  """Runs the tool loop over `client.chat`; returns the final reply's content (for the reward).

  `prompt` is a question, a dataset row with a question, or chat messages. Limits come from `client.config`
  (`max_turns`, `max_tool_calls`, `max_observation_tokens`); malformed calls are answered with their error.
  As in the ReTool loop, a reply ends at `</code>` (when the `code` format is on), so the model reads the
  interpreter's output instead of imagining it; `<tool_call>` replies end with the turn, so one reply may hold
  several calls.
  """
  config = client.config
  messages = _messages(prompt)
  schemas = tools.schemas() if tools is not None else None
  stop = (CODE_CLOSE,) if tools is not None and "code" in config.call_formats else ()
  calls = 0
  reply: dict = {"content": ""}
  for _ in range(config.max_turns):
    reply = await client.chat(messages, tools=schemas, stop=stop)
    messages.append(reply)
    items = sorted(reply.get("tool_calls", []) + reply.get("invalid_tool_calls", []), key=lambda c: c["index"])
    if not items or tools is None or client.last_finish_reason == "length":
      break
    calls += len(items)
    if calls > config.max_tool_calls:
      break
    start = time.perf_counter()
    results = await asyncio.gather(*(_answer(item, tools) for item in items))
    outputs, _ = truncate_outputs([out for out, _ in results], client.tokenizer, config.max_observation_tokens)
    client.record_tool_stats(len(items), sum(not ok for _, ok in results), time.perf_counter() - start)
    messages += [{"role": "tool", "content": out} for out in outputs]
  return reply.get("content", "")


async def _answer(item: dict, tools: Any) -> tuple[str, bool]:
  if "error" in item:
    return item["error"], False
  fn = item["function"]
  result = await tools.call(fn["name"], json.loads(fn["arguments"]))
  return result.output, bool(result.ok)
