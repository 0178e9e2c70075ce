"""Model checkpoints: the Orbax layout (`load`, `save`) and converters from / to Hugging Face and Megatron.

model = retool_jax.checkpoint.load("ckpt/qwen3-1.7b", mesh=mesh, dtype="bfloat16")
"""

from retool_jax.checkpoint.converters import (
  ConversionError,
  ConversionSummary,
  hf_to_orbax,
  megatron_to_orbax,
  orbax_to_hf,
)
from retool_jax.checkpoint.layout import CONFIG_ITEM, PARAMS_ITEM, load, read_config, save

__all__ = [
  "load",
  "save",
  "read_config",
  "hf_to_orbax",
  "megatron_to_orbax",
  "orbax_to_hf",
  "ConversionError",
  "ConversionSummary",
  "PARAMS_ITEM",
  "CONFIG_ITEM",
]
