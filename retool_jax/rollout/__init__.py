"""Generation engines and the multi-turn tool loop."""

from retool_jax.rollout.agentic import AgentRollout, ChatClient, run_agent
from retool_jax.rollout.jax_engine import JaxEngine
from retool_jax.rollout.multiturn import MultiTurnConfig, Rollout, TurnStats, generate_multiturn
from retool_jax.rollout.sglang_engine import SGLangEngine, SGLangError, SGLangOptions
from retool_jax.rollout.types import Engine, FinishReason, GenerateRequest, GenerateResult, SamplingParams

__all__ = [
  "AgentRollout",
  "ChatClient",
  "run_agent",
  "JaxEngine",
  "MultiTurnConfig",
  "Rollout",
  "TurnStats",
  "generate_multiturn",
  "Engine",
  "FinishReason",
  "GenerateRequest",
  "GenerateResult",
  "SamplingParams",
  "SGLangEngine",
  "SGLangError",
  "SGLangOptions",
]
