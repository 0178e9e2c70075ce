"""TensorFlow Datasets builders for the datasets the loaders know, and a reader back to internal records.

Needs the optional extra: `pip install 'retool_jax[tfds]'` (TensorFlow itself is not required).
"""

try:
  import tensorflow_datasets  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
  raise ImportError(
    "retool_jax.data.tfds needs tensorflow-datasets; install it with: pip install 'retool_jax[tfds]'"
  ) from e

from retool_jax.data.tfds.builders import (
  BUILDERS,
  Aime2024,
  Aime2025,
  ChatSft,
  DapoMath17k,
  Gsm8k,
  LocalFilesBuilder,
  LocalFilesConfig,
  Math500,
  MathConfig,
  PreferencePairs,
  RetoolSft,
  ReToolSftConfig,
  prepare,
  record_features,
)
from retool_jax.data.tfds.codec import decode, encode
from retool_jax.data.tfds.reader import RecordSource, load_records

__all__ = [
  "BUILDERS",
  "Aime2024",
  "Aime2025",
  "ChatSft",
  "DapoMath17k",
  "Gsm8k",
  "LocalFilesBuilder",
  "LocalFilesConfig",
  "Math500",
  "MathConfig",
  "PreferencePairs",
  "ReToolSftConfig",
  "RecordSource",
  "RetoolSft",
  "decode",
  "encode",
  "load_records",
  "prepare",
  "record_features",
]
