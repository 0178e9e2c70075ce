"""RL rollouts by a user's agent (`rollout.agent`): each trajectory is what the agent's client recorded.

`rollout.agent = "my_pkg.agents:solve"` names an `async def solve(client, prompt, tools)`;
`rollout.agent_client` says what `client` is: `"openai"` (default), an `openai.AsyncOpenAI` on its own session
of an in-process server (`retool_jax.serve.openai_agent`), or `"chat"`, the project's `ChatClient`. Either way
the trainer gets each conversation's ids, log-probs and loss mask as the engine saw and produced them, scored
by the run's reward like the framework-driven rollouts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from retool_jax.chat import render_ids
from retool_jax.rollout.agentic import AgentRollout, load_agent, run_agent
from retool_jax.rollout.multiturn import MultiTurnConfig, Rollout
from retool_jax.rollout.scoring import score_rollouts
from retool_jax.serve.openai_agent import run_openai_agent

__all__ = ["AGENT_CLIENTS", "AgentSpec", "agent_rollout_and_score", "split_agent"]

AGENT_CLIENTS = ("openai", "chat")


@dataclasses.dataclass(frozen=True)
class AgentSpec:
  agent: Any  # "module:function" or the function
  client: str = "openai"

  def __post_init__(self):
    if self.client not in AGENT_CLIENTS:
      raise ValueError(f"rollout.agent_client={self.client!r}; expected one of {AGENT_CLIENTS}")
    load_agent(self.agent)  # a bad spec is an error now, not at the first step


def split_agent(rollout: Mapping[str, Any]) -> tuple[dict[str, Any], AgentSpec | None]:
  """The rollout config without `agent` / `agent_client` (the `MultiTurnConfig` fields), and the agent."""
  values = dict(rollout.to_dict() if hasattr(rollout, "to_dict") else rollout)
  agent, client = values.pop("agent", None), values.pop("agent_client", "openai")
  if not agent:
    if client != "openai":
      raise ValueError(f"rollout.agent_client={client!r} is set but rollout.agent is not")
    return values, None
  return values, AgentSpec(agent, client)


async def agent_rollout_and_score(
  spec: AgentSpec,
  engine: Any,
  prompts: Sequence[Any],
  answers: Sequence[str],
  tools: Any,
  multiturn: MultiTurnConfig,
  reward_fn: Any,
  tokenizer: Any,
) -> tuple[list[Rollout], list[Any]]:
  """`rollout_and_score` with the agent driving each trajectory (trajectory i seeded as `run_agent` seeds it)."""
  run = run_openai_agent if spec.client == "openai" else run_agent
  outs = await run(engine, spec.agent, prompts, tools, multiturn, tokenizer=tokenizer)
  rollouts = [_trajectory(out, prompt, tokenizer, multiturn) for out, prompt in zip(outs, prompts)]
  return rollouts, score_rollouts(reward_fn, rollouts, answers)


def _trajectory(out: AgentRollout, prompt: Any, tokenizer: Any, multiturn: MultiTurnConfig) -> Rollout:
  """The agent's last segment; an agent that raised keeps what it recorded, marked aborted (or, having recorded
  nothing, its prompt with an empty response)."""
  if out.segments:
    r = out.rollout
    return dataclasses.replace(r, status="aborted", stop_reason=out.error) if out.status == "aborted" else r
  if isinstance(prompt, Sequence) and not isinstance(prompt, str) and all(isinstance(t, int) for t in prompt):
    ids = list(prompt)
  else:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    ids = render_ids(tokenizer, messages, enable_thinking=multiturn.enable_thinking)
  return Rollout(ids, [0] * len(ids), [0.0] * len(ids), len(ids), "aborted", out.error or "agent", [], "")
