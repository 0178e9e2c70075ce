"""Live policy parameters -> a Hugging Face folder an inference server can load (`update_weights_from_disk`).

    path = write_hf_checkpoint(model, cfg, "/ckpt/sync/weight_v7", dtype="bfloat16")

The folder is written beside its destination and renamed into place, so a server never sees half a checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
from flax import nnx

from retool_jax.checkpoint.hf_export import write_hf
from retool_jax.models.qwen3 import Qwen3
from retool_jax.models.qwen3_config import Qwen3Config

_VERSION_DIR = re.compile(r"^weight_v(\d+)$")


def version_dir(sync_dir: str | os.PathLike, version: int) -> str:
  """`<sync_dir>/weight_v<version>`."""
  if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 0:
    raise ValueError(f"weight version {version!r} must be a non-negative int")
  return os.path.join(os.fspath(sync_dir), f"weight_v{int(version)}")


def write_hf_checkpoint(
  model_or_state: Qwen3 | nnx.State,
  cfg: Qwen3Config | None,
  dst: str | os.PathLike,
  *,
  dtype=None,
  max_shard_bytes: int = 4 << 30,
) -> str:
  """Writes the parameters as a HF folder at `dst`, replacing an older one only once complete; returns `dst`."""
  write_hf(model_or_state, cfg, dst, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=True)
  return os.path.abspath(os.fspath(dst))


def prune_versions(sync_dir: str | os.PathLike, keep: int) -> list[str]:
  """Removes all but the newest `keep` `weight_v<N>` folders under `sync_dir`; returns the removed paths."""
  if keep < 1:
    raise ValueError(f"keep={keep} must be >= 1 (the server still reads the newest checkpoint)")
  sync_dir = os.fspath(sync_dir)
  if not os.path.isdir(sync_dir):
    return []
  found = sorted((int(m.group(1)), n) for n in os.listdir(sync_dir) if (m := _VERSION_DIR.match(n)))
  removed = []
  for _, n in found[:-keep]:
    path = os.path.join(sync_dir, n)
    shutil.rmtree(path, ignore_errors=True)
    removed.append(path)
  return removed
