"""An OpenAI-compatible server on the project's engines (`python -m retool_jax.serve`), and RL rollouts of
agents written against the OpenAI API (`run_openai_agent`)."""

from retool_jax.serve.app import create_app
from retool_jax.serve.backend import ServeBackend, ServeSettings

__all__ = ["ServeBackend", "ServeSettings", "create_app"]
