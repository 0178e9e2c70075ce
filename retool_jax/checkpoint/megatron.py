"""Reading Megatron-Core `torch_dist` checkpoints as Hugging Face-keyed tensors, on CPU, without Megatron.

The folder is read with `torch.distributed.checkpoint`, which reassembles tensor- and pipeline-parallel shards
into global tensors. Names are Megatron's GPTModel names with the Transformer-Engine spellings:

    embedding.word_embeddings.weight                        [padded_vocab, hidden] (rows past the vocab trimmed)
    decoder.layers.self_attention.linear_qkv.layer_norm_weight   input norm
    decoder.layers.self_attention.linear_qkv.weight         [groups, heads/groups + 2, head_dim, hidden] -> q, k, v
    decoder.layers.self_attention.{q,k}_layernorm.weight    q / k norms
    decoder.layers.mlp.linear_fc1.layer_norm_weight         post-attention norm (also `pre_mlp_layernorm.weight`)
    decoder.layers.mlp.linear_fc1.weight                    gate rows, then up rows
    decoder.layers.mlp.router.weight, ...experts...         MoE
    decoder.final_layernorm.weight, output_layer.weight     (no output layer when tied)

Layers of one structure are stacked under `decoder.layers.` with a leading `[num_layers]` axis; otherwise
each has `decoder.layers.N.`. Experts come stacked (`mlp.experts.experts.linear_fc1.weight`, `[.., E, ..]`),
per expert (`mlp.experts.local_experts.E.linear_fc1.weight`) or grouped (`mlp.experts.linear_fc1.weightE`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Callable

import ml_dtypes
import numpy as np

from retool_jax.models.qwen3_config import Qwen3Config

NOT_WEIGHTS = re.compile(r"(^|\.)_extra_state|^rng_state|^optimizer\.|^rerun_state_machine|\.inv_freq$")
_LAYER = re.compile(r"^decoder\.layers\.(?:(\d+)\.)?(.+)$")
_EXPERT = re.compile(
  r"^mlp\.experts\.(?:local_experts\.(\d+)\.(linear_fc[12])\.weight|(linear_fc[12])\.weight(\d+)"
  r"|experts\.(linear_fc[12])\.weight)$"
)


class MegatronCheckpointError(ValueError):
  pass


def resolve_iteration(path: str | os.PathLike) -> str:
  """The iteration folder: `path` itself, or the one `latest_checkpointed_iteration.txt` names."""
  path = os.fspath(path)
  tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
  if os.path.isfile(tracker):
    with open(tracker) as f:
      it = f.read().strip()
    name = "release" if it == "release" else f"iter_{int(it):07d}" if it.isdigit() else None
    if name is None:
      raise MegatronCheckpointError(f"{tracker}: expected an iteration number or 'release', got {it!r}")
    path = os.path.join(path, name)
    if not os.path.isdir(path):
      raise MegatronCheckpointError(f"{tracker} names {name}, which does not exist")
  if not os.path.isfile(os.path.join(path, ".metadata")):
    raise MegatronCheckpointError(
      f"{path}: not a torch_dist checkpoint (no .metadata; expected a torch_dist "
      f"folder with latest_checkpointed_iteration.txt, or an iter_*/release folder)"
    )
  meta = os.path.join(path, "metadata.json")
  if os.path.isfile(meta):
    with open(meta) as f:
      backend = json.load(f).get("sharded_backend")
    if backend not in (None, "torch_dist"):
      raise MegatronCheckpointError(f"{meta}: sharded_backend={backend!r}; only 'torch_dist' is supported")
  return path


class TorchDistReader:
  """The global tensors of one torch_dist iteration folder (no optimizer state, no Python objects)."""

  def __init__(self, path: str | os.PathLike):
    try:
      # torch is optional: only reading Megatron checkpoints needs it.
      import torch  # noqa: PLC0415
      import torch.distributed.checkpoint as dcp  # noqa: PLC0415
      from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata  # noqa: PLC0415
    except ImportError as e:
      raise ImportError("reading Megatron checkpoints needs PyTorch (CPU is enough): pip install torch") from e
    self._torch, self._dcp, self._index = torch, dcp, MetadataIndex
    self.dir = resolve_iteration(path)
    self._reader = dcp.FileSystemReader(self.dir)
    try:
      metadata = self._reader.read_metadata()
    except Exception as e:  # a damaged .metadata fails inside pickle with assorted errors
      raise MegatronCheckpointError(f"{os.path.join(self.dir, '.metadata')}: cannot be read ({e})") from None
    self._meta = {
      k: v
      for k, v in metadata.state_dict_metadata.items()
      if isinstance(v, TensorStorageMetadata) and not NOT_WEIGHTS.search(k)
    }
    self._storage = metadata.storage_data

  def keys(self) -> list[str]:
    return list(self._meta)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._meta[key].size)

  def dtype(self, key: str) -> np.dtype:
    dtype = self._meta[key].properties.dtype
    return np.dtype(ml_dtypes.bfloat16) if dtype == self._torch.bfloat16 else np.dtype(str(dtype).split(".")[-1])

  def files_of(self, key: str) -> list[str]:
    return sorted(
      {
        os.path.join(self.dir, self._storage[self._index(key, c.offsets)].relative_path)
        for c in self._meta[key].chunks
      }
    )

  def check_files(self, key: str) -> None:
    """Every byte range of `key` lies inside an existing file."""
    for chunk in self._meta[key].chunks:
      info = self._storage[self._index(key, chunk.offsets)]
      path = os.path.join(self.dir, info.relative_path)
      if not os.path.isfile(path):
        raise MegatronCheckpointError(f"{path}: missing shard file holding tensor {key!r}")
      size = os.path.getsize(path)
      if info.offset + info.length > size:
        raise MegatronCheckpointError(
          f"{path}: truncated file: tensor {key!r} needs bytes up to {info.offset + info.length}, file has {size}"
        )

  def read(self, key: str) -> np.ndarray:
    torch = self._torch
    meta = self._meta[key]
    out = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    try:
      with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        self._dcp.load({key: out}, storage_reader=self._reader, no_dist=True)
    except Exception as e:
      raise MegatronCheckpointError(f"{', '.join(self.files_of(key))}: cannot read tensor {key!r} ({e})") from None
    if out.dtype == torch.bfloat16:
      return out.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return out.numpy()


# ---- Megatron pieces -> hub tensors -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Piece:
  """The hub tensor `hf_key` is `split(mkey[layer][expert])` (indices only for stacked axes)."""

  mkey: str
  layer: int | None
  expert: int | None
  split: Callable[[np.ndarray], np.ndarray]


def _same(x):
  return x


def _qkv(part: str, cfg: Qwen3Config) -> Callable[[np.ndarray], np.ndarray]:
  groups, per = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads

  def split(x):
    rest = x.shape[1:]
    x = x.reshape((groups, per + 2, cfg.head_dim) + rest)
    y = x[:, :per] if part == "q" else x[:, per] if part == "k" else x[:, per + 1]
    return y.reshape((-1,) + rest)

  return split


def _half(first: bool) -> Callable[[np.ndarray], np.ndarray]:
  def split(x):
    if x.shape[0] % 2:
      raise ValueError(f"linear_fc1 has an odd number of rows ({x.shape[0]})")
    n = x.shape[0] // 2
    return x[:n] if first else x[n:]

  return split


def _rows(n: int) -> Callable[[np.ndarray], np.ndarray]:
  def split(x):
    if x.shape[0] < n:
      raise ValueError(f"{x.shape[0]} rows, fewer than vocab_size={n}")
    return x[:n]

  return split


# Per-layer Megatron suffix -> [(hub suffix inside `model.layers.{i}.`, split)]. `None` split means identity.
def _layer_suffixes(cfg: Qwen3Config) -> dict[str, list[tuple[str, Callable]]]:
  attn = {
    f"self_attention.linear_qkv.{w}": [(f"self_attn.{p}_proj.{w}", _qkv(p, cfg)) for p in "qkv"]
    for w in ("weight", "bias")
  }
  return {
    "self_attention.linear_qkv.layer_norm_weight": [("input_layernorm.weight", _same)],
    "input_layernorm.weight": [("input_layernorm.weight", _same)],
    **attn,
    "self_attention.linear_proj.weight": [("self_attn.o_proj.weight", _same)],
    "self_attention.linear_proj.bias": [("self_attn.o_proj.bias", _same)],
    "self_attention.q_layernorm.weight": [("self_attn.q_norm.weight", _same)],
    "self_attention.k_layernorm.weight": [("self_attn.k_norm.weight", _same)],
    "mlp.linear_fc1.layer_norm_weight": [("post_attention_layernorm.weight", _same)],
    "pre_mlp_layernorm.weight": [("post_attention_layernorm.weight", _same)],
    "mlp.linear_fc1.weight": [("mlp.gate_proj.weight", _half(True)), ("mlp.up_proj.weight", _half(False))],
    "mlp.linear_fc2.weight": [("mlp.down_proj.weight", _same)],
    "mlp.router.weight": [("mlp.gate.weight", _same)],
  }


_EXPERT_SUFFIXES = {
  "linear_fc1": [("gate_proj", _half(True)), ("up_proj", _half(False))],
  "linear_fc2": [("down_proj", _same)],
}


class MegatronTensors:
  """A torch_dist checkpoint seen as hub-keyed tensors (`keys`, `get`, `shape`, `dtype`, `file_of`)."""

  def __init__(self, path: str | os.PathLike, cfg: Qwen3Config, cache_size: int = 1):
    self.reader = TorchDistReader(path)
    self.dir = self.reader.dir
    self.cfg = cfg
    self._pieces: dict[str, _Piece] = {}
    self._cache: dict[str, np.ndarray] = {}
    self._cache_size = cache_size
    suffixes = _layer_suffixes(cfg)
    for mkey in self.reader.keys():
      self._add(mkey, suffixes)

  def _add(self, mkey: str, suffixes) -> None:
    cfg = self.cfg
    top = {
      "embedding.word_embeddings.weight": ("model.embed_tokens.weight", _rows(cfg.vocab_size)),
      "decoder.final_layernorm.weight": ("model.norm.weight", _same),
      "output_layer.weight": ("lm_head.weight", _rows(cfg.vocab_size)),
    }
    if mkey in top:
      hf_key, split = top[mkey]
      self._put(hf_key, _Piece(mkey, None, None, split))
      return
    m = _LAYER.match(mkey)
    if m is None:
      raise self._unknown(mkey)
    index, suffix = m.groups()
    layers = [int(index)] if index is not None else range(self._stacked_layers(mkey))
    stacked = index is None
    if suffix in suffixes:
      for li in layers:
        for hf_suffix, split in suffixes[suffix]:
          self._put(f"model.layers.{li}.{hf_suffix}", _Piece(mkey, li if stacked else None, None, split))
      return
    e = _EXPERT.match(suffix)
    if e is None:
      raise self._unknown(mkey)
    local_e, local_w, grouped_w, grouped_e, stacked_w = e.groups()
    weight = local_w or grouped_w or stacked_w
    if stacked_w:
      n = self.reader.shape(mkey)[1 if stacked else 0]
      experts = [(ei, ei) for ei in range(n)]
    else:
      ei = int(local_e if local_e is not None else grouped_e)
      experts = [(ei, None)]
    for li in layers:
      for ei, axis_index in experts:
        for name, split in _EXPERT_SUFFIXES[weight]:
          self._put(
            f"model.layers.{li}.mlp.experts.{ei}.{name}.weight",
            _Piece(mkey, li if stacked else None, axis_index, split),
          )

  def _stacked_layers(self, mkey: str) -> int:
    n = self.reader.shape(mkey)[0]
    if n != self.cfg.num_hidden_layers:
      raise MegatronCheckpointError(
        f"{self.reader.files_of(mkey)[0]}: stacked tensor {mkey!r} has {n} layers, but the config has "
        f"num_hidden_layers={self.cfg.num_hidden_layers}"
      )
    return n

  def _unknown(self, mkey: str) -> MegatronCheckpointError:
    return MegatronCheckpointError(
      f"{self.reader.files_of(mkey)[0]}: unknown tensor {mkey!r} "
      f"{self.reader.shape(mkey)} (not part of a Qwen3 GPTModel)"
    )

  def _put(self, hf_key: str, piece: _Piece) -> None:
    if hf_key in self._pieces:
      raise MegatronCheckpointError(
        f"{self.dir}: both {self._pieces[hf_key].mkey!r} and {piece.mkey!r} provide {hf_key}"
      )
    self._pieces[hf_key] = piece

  # -- the tensor-source interface ------------------------------------------------------------------

  def keys(self) -> list[str]:
    return list(self._pieces)

  def file_of(self, hf_key: str) -> str:
    piece = self._pieces[hf_key]
    return f"{', '.join(self.reader.files_of(piece.mkey))} (Megatron tensor {piece.mkey!r})"

  def _apply(self, piece: _Piece, x: np.ndarray) -> np.ndarray:
    if piece.layer is not None:
      x = x[piece.layer]
    if piece.expert is not None:
      x = x[piece.expert]
    return piece.split(x)

  def shape(self, hf_key: str) -> tuple[int, ...]:
    piece = self._pieces[hf_key]
    self.reader.check_files(piece.mkey)
    stand_in = np.broadcast_to(np.zeros((), np.uint8), self.reader.shape(piece.mkey))
    try:
      return tuple(self._apply(piece, stand_in).shape)
    except (ValueError, IndexError) as e:
      raise MegatronCheckpointError(
        f"{self.file_of(hf_key)}: shape {self.reader.shape(piece.mkey)} does not fit the config ({e})"
      ) from None

  def dtype(self, hf_key: str) -> np.dtype:
    return self.reader.dtype(self._pieces[hf_key].mkey)

  def get(self, hf_key: str) -> np.ndarray:
    if hf_key not in self._pieces:
      raise MegatronCheckpointError(f"{self.dir}: no tensor provides {hf_key}")
    piece = self._pieces[hf_key]
    if piece.mkey not in self._cache:
      if len(self._cache) >= self._cache_size:
        self._cache.pop(next(iter(self._cache)))
      self._cache[piece.mkey] = self.reader.read(piece.mkey)
    return np.ascontiguousarray(self._apply(piece, self._cache[piece.mkey]))
