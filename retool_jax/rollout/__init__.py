"""Generation engines and the multi-turn tool loop."""

from retool_jax.rollout.sglang_engine import SGLangEngine, SGLangError, SGLangOptions
from retool_jax.rollout.types import Engine, FinishReason, GenerateRequest, GenerateResult, SamplingParams

__all__ = ["Engine", "FinishReason", "GenerateRequest", "GenerateResult", "SamplingParams",
           "SGLangEngine", "SGLangError", "SGLangOptions"]
