"""RL rollouts of agents written against the OpenAI API: each trajectory is a session of an in-process server.

    rollouts = await run_openai_agent(engine, "my_pkg.agents:solve", prompts, tools, config)

`solve(client, prompt, tools)` gets an `openai.AsyncOpenAI` whose base URL is its own session
(`http://retool-serve/sessions/<i>/v1`, served model `policy`). Requests travel through httpx's ASGI transport
to the server's app on the caller's event loop, without sockets. Each session's recorder is seeded as
`run_agent` seeds its `ChatClient`, so an agent gives the same trajectories (ids, loss masks, log-probs)
written against either client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import openai

from retool_jax.rollout.agentic import Agent, AgentRollout, ChatClient, run_agent
from retool_jax.rollout.multiturn import MultiTurnConfig, default_tokenizer
from retool_jax.serve.app import create_app
from retool_jax.serve.backend import ServeBackend, ServeSettings

__all__ = ["BASE_URL", "MODEL", "run_openai_agent"]

BASE_URL = "http://retool-serve"
MODEL = "policy"


async def run_openai_agent(
  engine: Any,
  agent: str | Agent,
  prompts: Sequence[Any],
  tools: Any = None,
  config: MultiTurnConfig | Any = None,
  *,
  tokenizer: Any = None,
) -> list[AgentRollout]:
  """`run_agent` for OpenAI-client agents (same arguments, same results)."""
  config = MultiTurnConfig.from_any(config)
  tokenizer = tokenizer or default_tokenizer(engine)
  backend = ServeBackend(engine, tokenizer, ServeSettings(config, max_pending=None), model_name=MODEL)
  transport = httpx.ASGITransport(app=create_app(backend))
  async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=None) as http:

    def client_for(i: int, chat: ChatClient) -> openai.AsyncOpenAI:
      backend.sessions.add(str(i), chat)
      return openai.AsyncOpenAI(
        base_url=f"{BASE_URL}/sessions/{i}/v1", api_key="retool", http_client=http, max_retries=0
      )

    return await run_agent(engine, agent, prompts, tools, config, tokenizer=tokenizer, client_for=client_for)
