"""Live policy parameters -> a Hugging Face folder an inference server can load (`update_weights_from_disk`).

    path = write_hf_checkpoint(model, cfg, "/ckpt/sync/weight_v7", dtype="bfloat16")

The folder is written beside its destination and renamed into place, so a server never sees half a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from typing import Any

import numpy as np
from flax import nnx

from retool_jax.models.qwen3 import Qwen3
from retool_jax.models.qwen3_config import Qwen3Config
from retool_jax.models.qwen3_hf import hf_tensors
from retool_jax.models.safetensors_io import write_sharded

_VERSION_DIR = re.compile(r"^weight_v(\d+)$")


def version_dir(sync_dir: str | os.PathLike, version: int) -> str:
  """`<sync_dir>/weight_v<version>`."""
  if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 0:
    raise ValueError(f"weight version {version!r} must be a non-negative int")
  return os.path.join(os.fspath(sync_dir), f"weight_v{int(version)}")


def _hf_config(cfg: Qwen3Config, dtype: np.dtype) -> dict[str, Any]:
  out = cfg.to_hf()
  out["torch_dtype"] = dtype.name
  return out


def _generation_config(cfg: Qwen3Config) -> dict[str, Any]:
  out = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
  if cfg.pad_token_id is not None:
    out["pad_token_id"] = cfg.pad_token_id
  return out


def write_hf_checkpoint(model_or_state: Qwen3 | nnx.State, cfg: Qwen3Config | None, dst: str | os.PathLike, *,
                        dtype=None, max_shard_bytes: int = 4 << 30) -> str:
  """Writes safetensors shards, `config.json` and `generation_config.json` to `dst`; returns `dst`.

  `cfg` may be None when `model_or_state` is a `Qwen3` (its own config is used). `dtype` defaults to the
  config's `param_dtype`. An existing `dst` is replaced only after the new folder is complete.
  """
  if cfg is None:
    if not isinstance(model_or_state, Qwen3):
      raise ValueError("write_hf_checkpoint needs a Qwen3Config when given parameters rather than a Qwen3 model")
    cfg = model_or_state.config
  out_dtype = np.dtype(dtype if dtype is not None else cfg.param_dtype)
  dst = os.path.abspath(os.fspath(dst))
  parent, name = os.path.split(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  try:
    write_sharded(tmp, hf_tensors(model_or_state, cfg, dtype=out_dtype), max_shard_bytes=max_shard_bytes)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(_hf_config(cfg, out_dtype), f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump(_generation_config(cfg), f, indent=2)
    if os.path.exists(dst):
      old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
      os.rename(dst, old)
      os.rename(tmp, dst)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dst


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
