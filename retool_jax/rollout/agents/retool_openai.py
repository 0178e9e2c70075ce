"""The ReTool agent written against the OpenAI API, for `rollout.agent` with `rollout.agent_client="openai"`
(or any OpenAI-compatible server: `python -m retool_jax.serve`).

    client = openai.AsyncOpenAI(base_url="http://localhost:8000/v1", api_key="none")
    answer = await retool_openai_agent(client, "What is 6 * 7?", tools)

The same loop as `retool_agent`: reply, run every call (malformed ones, which the server returns in the
message's `invalid_tool_calls`, are answered with their error), repeat until a reply has no calls.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from retool_jax.rollout.agents.retool import _messages
from retool_jax.rollout.multiturn import CODE_CLOSE

MAX_TURNS = 16
MAX_TOOL_CALLS = 16


async def retool_openai_agent(client: Any, prompt: Any, tools: Any, *, model: str | None = None) -> str:
  """Runs the tool loop over `client.chat.completions`; returns the final reply's content (for the reward).

  `model` defaults to the first model the server lists. Replies stop at `</code>` so that the model reads
  the interpreter's output instead of imagining it.
  """
  model = model or (await client.models.list()).data[0].id
  messages = _messages(prompt)
  schemas = tools.schemas() if tools is not None else None
  extra = {"tools": schemas, "stop": [CODE_CLOSE]} if schemas else {}
  calls, content = 0, ""
  for _ in range(MAX_TURNS):
    response = await client.chat.completions.create(model=model, messages=messages, **extra)
    choice = response.choices[0]
    message = choice.message.model_dump(exclude_none=True)
    content = message.get("content") or ""
    messages.append(message)
    items = sorted(message.get("tool_calls", []) + message.get("invalid_tool_calls", []), key=lambda c: c["index"])
    if not items or tools is None or choice.finish_reason == "length":
      break
    calls += len(items)
    if calls > MAX_TOOL_CALLS:
      break
    outputs = await asyncio.gather(*(_answer(item, tools) for item in items))
    messages += [
      {"role": "tool", "tool_call_id": item.get("id", ""), "content": out} for item, out in zip(items, outputs)
    ]
  return content


async def _answer(item: dict, tools: Any) -> str:
  if "error" in item:
    return item["error"]
  fn = item["function"]
  try:
    arguments = json.loads(fn["arguments"])
  except ValueError as e:
    return f"Error: the arguments of {fn['name']} are not JSON ({e})"
  return (await tools.call(fn["name"], arguments)).output
