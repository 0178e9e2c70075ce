"""retool_jax: JAX-native SFT -> RL for tool-using language models."""

__version__ = "0.1.0"
