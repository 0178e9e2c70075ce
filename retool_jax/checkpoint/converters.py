"""Checkpoint conversion: Hugging Face or Megatron-Core -> Orbax, and Orbax -> Hugging Face.

Every direction goes through the one HF <-> retool_jax mapping (`models.qwen3_hf.param_sources`), one tensor
at a time: sources are validated up front (names, shapes, file integrity), then each tensor is read, converted
and written before the next is touched. Destinations appear only when complete.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import mmap
import os
import time
from typing import Any, Iterator, Mapping

import numpy as np
from flax import nnx

from retool_jax.chat.prompt_contract import find_contract
from retool_jax.checkpoint import layout
from retool_jax.checkpoint.hf_export import GENERATION_CONFIG, write_hf
from retool_jax.checkpoint.megatron import MegatronTensors
from retool_jax.checkpoint.streaming import StreamedArray
from retool_jax.models.qwen3_config import Qwen3Config
from retool_jax.models.qwen3_hf import ParamSource, abstract_model, check_tensors, hf_shapes, param_sources
from retool_jax.models.safetensors_io import SafetensorsDir, SafetensorsError
from retool_jax.progress import progress_bar


class ConversionError(ValueError):
  """A source checkpoint that does not fit its config or is damaged."""


@dataclasses.dataclass
class ConversionSummary:
  source: str
  destination: str
  fmt: str
  dtype: str
  num_tensors: int
  num_params: int
  num_bytes: int
  seconds: float
  files: list[str]

  def __str__(self) -> str:
    gb = self.num_bytes / 1e9
    rate = self.num_bytes / 1e6 / max(self.seconds, 1e-9)
    return (
      f"wrote {self.fmt} checkpoint {self.destination}\n"
      f"  from {self.source}\n"
      f"  {self.num_tensors} tensors, {self.num_params:,} parameters, {gb:.3f} GB as {self.dtype}, "
      f"{self.seconds:.1f} s ({rate:.0f} MB/s)\n"
      f"  files: {', '.join(self.files)}"
    )


# ---- shapes the config implies -------------------------------------------------------------------


def _our_shapes(cfg: Qwen3Config) -> dict[tuple[str, ...], tuple[int, ...]]:
  _, abstract = abstract_model(cfg)
  return {path: tuple(v.get_value().shape) for path, v in nnx.to_flat_state(abstract)}


def check_source(tensors, cfg: Qwen3Config, config_path: str) -> dict[str, tuple[int, ...]]:
  """Checks names and shapes of a `get`/`keys` tensor source against `cfg` before anything is converted."""
  try:
    return check_tensors(tensors, cfg, config_path)
  except SafetensorsError as e:
    raise ConversionError(str(e)) from None


# ---- to Orbax --------------------------------------------------------------------------------------

_BLOCK_BYTES = 64 << 20  # rows of a top-level tensor written per block


def _release(array: np.ndarray) -> None:
  """Drops a memory-mapped source array's pages from this process (they stay in the page cache)."""
  base = array
  while base is not None and not isinstance(base, np.memmap):
    base = getattr(base, "base", None)
  if base is None or not array.nbytes:
    return
  page = mmap.PAGESIZE
  start = array.ctypes.data // page * page
  end = array.ctypes.data + array.nbytes
  _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


@functools.cache
def _libc():
  libc = ctypes.CDLL(None, use_errno=True)
  libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
  return libc


def _blocks(
  tensors, src: ParamSource, cfg: Qwen3Config, dtype: np.dtype, block_rows: int, bar
) -> Iterator[tuple[int, np.ndarray]]:
  """Our parameter in blocks along axis 0: row blocks of a top-level tensor, or one layer at a time."""
  if src.hf_key is not None:
    raw = tensors.get(src.hf_key)
    value = src.layout.to_ours(raw, cfg)
    for start in range(0, value.shape[0], block_rows):
      yield start, np.asarray(value[start : start + block_rows]).astype(dtype)
      _release(raw)
    bar.update(1)
    return
  for li, key in enumerate(src.layer_keys):
    keys = [key.format(e=e) for e in range(src.num_experts)] if src.num_experts else [key]
    raws = [tensors.get(k) for k in keys]
    parts = [np.asarray(src.layout.to_ours(raw, cfg)).astype(dtype, copy=False) for raw in raws]
    yield li, (np.stack(parts) if src.num_experts else parts[0])[None]
    for raw in raws:
      _release(raw)
    bar.update(len(keys))


def _streamed_tree(tensors, cfg: Qwen3Config, dtype: np.dtype, bar) -> dict:
  ours = _our_shapes(cfg)
  tree: dict = {}
  for src in param_sources(cfg):
    shape = ours[src.path]
    rows = 1
    if src.hf_key is not None:
      row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
      rows = int(min(shape[0], max(1, _BLOCK_BYTES // max(row_bytes, 1))))
    node = tree
    for name in src.path[:-1]:
      node = node.setdefault(name, {})
    node[src.path[-1]] = StreamedArray(
      shape, dtype, rows, functools.partial(_blocks, tensors, src, cfg, dtype, rows, bar)
    )
  return tree


def _source_dtype(tensors) -> np.dtype:
  return np.dtype(
    tensors.dtype("model.embed_tokens.weight")
    if hasattr(tensors, "dtype")
    else tensors.get("model.embed_tokens.weight").dtype
  )


def tensors_to_orbax(
  tensors,
  hf_config: Mapping[str, Any],
  config_path: str,
  dst,
  *,
  dtype=None,
  generation_config: Mapping[str, Any] | None = None,
  progress: bool = True,
  source: str | None = None,
) -> ConversionSummary:
  """Converts any HF-keyed tensor source (`keys`, `get`, optionally `shape`/`dtype`/`file_of`) to Orbax."""
  start = time.perf_counter()
  cfg = Qwen3Config.from_hf(hf_config)
  expected = check_source(tensors, cfg, config_path)
  target = np.dtype(dtype) if dtype is not None else _source_dtype(tensors)
  cfg = cfg.replace(param_dtype=target.name, dtype=target.name)
  with progress_bar(len(expected), desc="convert", unit="tensor", disable=not progress) as bar:
    tree = _streamed_tree(tensors, cfg, target, bar)
    layout.save_streamed(dst, tree, layout.config_record(cfg, hf_config, generation_config))
  n = sum(int(np.prod(s)) for s in _our_shapes(cfg).values())
  return ConversionSummary(
    source or getattr(tensors, "dir", "?"),
    os.fspath(dst),
    "Orbax",
    target.name,
    len(expected),
    n,
    n * target.itemsize,
    time.perf_counter() - start,
    [layout.PARAMS_ITEM, layout.CONFIG_ITEM],
  )


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such file") from None
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: not valid JSON ({e})") from None


def _optional_json(path: str) -> dict | None:
  return _read_json(path) if os.path.isfile(path) else None


def hf_to_orbax(src, dst, *, dtype=None, progress: bool = True) -> ConversionSummary:
  """A Hugging Face `save_pretrained` folder -> an Orbax checkpoint (by default in the source's dtype)."""
  src = os.fspath(src)
  config_path = os.path.join(src, "config.json")
  return tensors_to_orbax(
    SafetensorsDir(src),
    _read_json(config_path),
    config_path,
    dst,
    dtype=dtype,
    generation_config=_optional_json(os.path.join(src, GENERATION_CONFIG)),
    progress=progress,
    source=src,
  )


def megatron_to_orbax(src, hf_config, dst, *, dtype=None, progress: bool = True) -> ConversionSummary:
  """A Megatron-Core `torch_dist` checkpoint plus the model's HF `config.json` -> an Orbax checkpoint."""
  config_path = os.fspath(hf_config)
  if os.path.isdir(config_path):
    config_path = os.path.join(config_path, "config.json")
  hf = _read_json(config_path)
  tensors = MegatronTensors(src, Qwen3Config.from_hf(hf))
  generation = _optional_json(os.path.join(os.path.dirname(config_path), GENERATION_CONFIG))
  return tensors_to_orbax(
    tensors, hf, config_path, dst, dtype=dtype, generation_config=generation, progress=progress, source=tensors.dir
  )


# ---- to Hugging Face --------------------------------------------------------------------------------


class _StoredParam:
  """One stored parameter, read a layer at a time (`[i]`) or whole (`np.asarray`)."""

  def __init__(self, reader: layout.ParamReader, path: tuple[str, ...]):
    self._store = reader.open(path)

  def __getitem__(self, index) -> np.ndarray:
    return self._store[index].read().result()

  def __array__(self, dtype=None, copy=None):
    value = self._store.read().result()
    return value if dtype is None else value.astype(dtype)


def orbax_to_hf(
  src, dst, *, dtype=None, tokenizer=None, max_shard_bytes: int = 4 << 30, progress: bool = True
) -> ConversionSummary:
  """An Orbax checkpoint -> a Hugging Face folder (config, generation config, sharded safetensors, index).

  The prompt contract recorded with the checkpoint (`find_contract`) is written beside the weights, with its
  tokenizer unless `tokenizer` names another folder.
  """
  start = time.perf_counter()
  reader = layout.ParamReader(src)
  contract = find_contract(os.fspath(reader.step))
  record = layout.read_config(reader.step)
  cfg = layout.config_from_record(record, where=os.fspath(reader.step / layout.CONFIG_ITEM))
  out_dtype = np.dtype(dtype if dtype is not None else cfg.param_dtype)
  layout.check_matches(reader.step, reader.stored, _our_shapes(cfg))
  specs = [(key, shape, out_dtype) for key, shape in hf_shapes(cfg).items()]
  state = nnx.from_flat_state({src_.path: _StoredParam(reader, src_.path) for src_ in param_sources(cfg)})
  with progress_bar(len(specs), desc="export", unit="tensor", disable=not progress) as bar:
    files = write_hf(
      state,
      cfg,
      dst,
      dtype=out_dtype,
      hf_config=record.get("hf_config"),
      generation_config=record.get("generation_config"),
      tokenizer=tokenizer,
      contract=contract,
      max_shard_bytes=max_shard_bytes,
      on_tensor=lambda _: bar.update(1),
    )
  n = sum(int(np.prod(s)) for _, s, _ in specs)
  return ConversionSummary(
    os.fspath(reader.step),
    dst,
    "Hugging Face",
    out_dtype.name,
    len(specs),
    n,
    n * out_dtype.itemsize,
    time.perf_counter() - start,
    files,
  )
