"""Writing safetensors shards whose layout is planned up front, so each tensor is written as it arrives."""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator, Sequence

import numpy as np

from retool_jax.models.safetensors_io import _NAMES, INDEX_FILE, SINGLE_FILE, SafetensorsError

TensorSpec = tuple[str, tuple[int, ...], np.dtype]


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
  """Groups tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for key, shape, dtype in specs:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((key, tuple(shape), np.dtype(dtype)))
    size += nbytes
  return shards


def _header(shard: list[TensorSpec]) -> bytes:
  header: dict = {"__metadata__": {"format": "pt"}}
  offset = 0
  for key, shape, dtype in shard:
    if dtype not in _NAMES:
      raise SafetensorsError(f"tensor {key!r}: dtype {dtype} cannot be written to safetensors")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  return raw + b" " * (-len(raw) % 8)


def write_planned(out_dir: str | os.PathLike, specs: Sequence[TensorSpec],
                  tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int = 4 << 30) -> list[str]:
  """Writes `tensors` (arriving in `specs` order, with those shapes and dtypes) as HF shards plus the index.

  Returns the file names written. Holds one tensor in memory at a time.
  """
  out_dir = os.fspath(out_dir)
  shards = plan_shards(specs, max_shard_bytes)
  n = len(shards)
  names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  it: Iterator[tuple[str, np.ndarray]] = iter(tensors)
  total = 0
  for name, shard in zip(names, shards):
    header = _header(shard)
    with open(os.path.join(out_dir, name), "wb") as f:
      f.write(struct.pack("<Q", len(header)))
      f.write(header)
      for key, shape, dtype in shard:
        got_key, value = next(it)
        if got_key != key or tuple(value.shape) != shape or value.dtype != dtype:
          raise SafetensorsError(f"{name}: expected tensor {key!r} {shape} {dtype}, got {got_key!r} "
                                 f"{tuple(value.shape)} {value.dtype}")
        f.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)
        total += value.nbytes
  if next(it, None) is not None:
    raise SafetensorsError("more tensors than planned")
  if n > 1:
    weight_map = {key: name for name, shard in zip(names, shards) for key, _, _ in shard}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    names.append(INDEX_FILE)
  return names
