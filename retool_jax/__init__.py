"""retool_jax: JAX-native SFT -> RL for tool-using language models."""

from retool_jax import quiet

__version__ = "0.1.0"

quiet.install()  # transformers' "PyTorch was not found" advice: the package needs only its tokenizers
