"""The CPU demo's synthetic tool-needing task: multi-digit multiplication, its tokenizer, its SFT teacher and
the SFT -> GRPO pipeline (`run_demo`)."""

from retool_jax.demo_task.pipeline import run_demo

__all__ = ["run_demo"]
