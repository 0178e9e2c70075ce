"""Example agents for `run_agent` (pass your own as `module:function`)."""

from retool_jax.rollout.agents.retool import retool_agent

__all__ = ["retool_agent"]
