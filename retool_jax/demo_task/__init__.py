"""The CPU demo's synthetic tool-needing task (multi-digit multiplication, its tokenizer and SFT teacher), its
data step, the product configs of its phases, and the orchestrator that runs them (`run_demo`)."""

from retool_jax.demo_task.pipeline import run_demo

__all__ = ["run_demo"]
