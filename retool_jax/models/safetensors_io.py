"""Streaming safetensors reading and writing on numpy memory maps (bfloat16 included, via ml_dtypes)."""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np

_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
}
DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}  # numpy dtype -> safetensors dtype name

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsError(ValueError):
  pass


class SafetensorsFile:
  """One `.safetensors` file; tensors are memory-mapped, so reading one costs only its own bytes."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise SafetensorsError(f"{self.path}: truncated file (no header)")
      (n,) = struct.unpack("<Q", raw)
      if n > size - 8:
        raise SafetensorsError(f"{self.path}: truncated file (header of {n} bytes, file of {size})")
      try:
        header = json.loads(f.read(n))
      except json.JSONDecodeError as e:
        raise SafetensorsError(f"{self.path}: corrupt header ({e})") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self._entries = header
    self._data_start = 8 + n
    self._size = size
    self._mmap: np.memmap | None = None

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, key: str) -> bool:
    return key in self._entries

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._entries[key]["shape"])

  def dtype(self, key: str) -> np.dtype:
    return np.dtype(_DTYPES[self._entries[key]["dtype"]])

  def get(self, key: str) -> np.ndarray:
    if key not in self._entries:
      raise SafetensorsError(f"{self.path}: no tensor {key!r}")
    e = self._entries[key]
    if e["dtype"] not in _DTYPES:
      raise SafetensorsError(f"{self.path}: tensor {key!r} has unsupported dtype {e['dtype']}")
    start, end = e["data_offsets"]
    if self._data_start + end > self._size:
      raise SafetensorsError(
        f"{self.path}: truncated file: tensor {key!r} needs bytes up to "
        f"{self._data_start + end}, file has {self._size}"
      )
    dtype = np.dtype(_DTYPES[e["dtype"]])
    shape = tuple(e["shape"])
    if (end - start) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise SafetensorsError(f"{self.path}: tensor {key!r} byte range does not match shape {shape}")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    return self._mmap[self._data_start + start : self._data_start + end].view(dtype).reshape(shape)


class SafetensorsDir:
  """All tensors of a `save_pretrained` folder: one file or shards listed in the index."""

  def __init__(self, hf_dir: str | os.PathLike):
    self.dir = os.fspath(hf_dir)
    index = os.path.join(self.dir, INDEX_FILE)
    single = os.path.join(self.dir, SINGLE_FILE)
    self._files: dict[str, SafetensorsFile] = {}
    if os.path.exists(index):
      with open(index) as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
          raise SafetensorsError(f"{index}: not a safetensors index ({e})") from None
      self._key_to_file = dict(weight_map)
      for name in sorted(set(weight_map.values())):
        path = os.path.join(self.dir, name)
        if not os.path.exists(path):
          raise SafetensorsError(f"{index} lists shard {name}, which is missing from {self.dir}")
    elif os.path.exists(single):
      self._key_to_file = {k: SINGLE_FILE for k in self._open(SINGLE_FILE).keys()}
    else:
      found = [n for n in os.listdir(self.dir) if n.endswith(".safetensors")] if os.path.isdir(self.dir) else []
      if not found:
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.dir}")
      self._key_to_file = {k: n for n in sorted(found) for k in self._open(n).keys()}

  def _open(self, name: str) -> SafetensorsFile:
    if name not in self._files:
      self._files[name] = SafetensorsFile(os.path.join(self.dir, name))
    return self._files[name]

  def keys(self) -> list[str]:
    return list(self._key_to_file)

  def __contains__(self, key: str) -> bool:
    return key in self._key_to_file

  def shape(self, key: str) -> tuple[int, ...]:
    return self._open(self._key_to_file[key]).shape(key)

  def file_of(self, key: str) -> str:
    return os.path.join(self.dir, self._key_to_file[key])

  def get(self, key: str) -> np.ndarray:
    if key not in self._key_to_file:
      raise SafetensorsError(f"{self.dir}: no tensor {key!r} in the checkpoint")
    f = self._open(self._key_to_file[key])
    if key not in f:
      raise SafetensorsError(f"{f.path}: the index says it holds {key!r}, but it does not")
    return f.get(key)


def write_file(
  path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None
) -> int:
  """Writes tensors to one safetensors file; returns the bytes written."""
  items = [(k, np.ascontiguousarray(v)) for k, v in tensors]
  header: dict = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  for k, v in items:
    if v.dtype not in DTYPE_NAMES:
      raise SafetensorsError(f"tensor {k!r}: dtype {v.dtype} cannot be written to safetensors")
    header[k] = {
      "dtype": DTYPE_NAMES[v.dtype],
      "shape": list(v.shape),
      "data_offsets": [offset, offset + v.nbytes],
    }
    offset += v.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for _, v in items:
      f.write(v.tobytes())
  return 8 + len(raw) + offset


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
    if dtype not in DTYPE_NAMES:
      raise SafetensorsError(f"tensor {key!r}: dtype {dtype} cannot be written to safetensors")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  return raw + b" " * (-len(raw) % 8)


def write_sharded(
  out_dir: str | os.PathLike,
  specs: Sequence[TensorSpec],
  tensors: Iterable[tuple[str, np.ndarray]],
  max_shard_bytes: int = 4 << 30,
) -> list[str]:
  """Writes `tensors` (arriving in `specs` order, with those shapes and dtypes) as HF shards plus the index.

  The shard layout is planned from `specs` up front, so each tensor is written as it arrives and only one
  is held in memory. Returns the file names written.
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
          raise SafetensorsError(
            f"{name}: expected tensor {key!r} {shape} {dtype}, got {got_key!r} {tuple(value.shape)} {value.dtype}"
          )
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
