"""The Hugging Face <-> retool_jax parameter mapping for Qwen3, and `load_hf`.

The hub layout stores one `[out, in]` matrix per layer (and per expert for MoE); we store einsum-shaped
kernels stacked over layers. `PARAM_MAP` is the single table both directions use.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retool_jax import sharding as sharding_lib
from retool_jax.models.qwen3 import Qwen3
from retool_jax.models.qwen3_config import Qwen3Config
from retool_jax.models.safetensors_io import SafetensorsDir, SafetensorsError


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one HF tensor becomes one of our (per-layer, per-expert) arrays and back."""

  to_ours: Callable[[np.ndarray, Qwen3Config], np.ndarray]
  to_hf: Callable[[np.ndarray, Qwen3Config], np.ndarray]


def _same(x, cfg):
  return x


def _t(x, cfg):
  return x.T


def _in_heads(heads: str) -> Layout:
  """`[heads*head_dim, hidden]` <-> `[hidden, heads, head_dim]`."""
  n = lambda cfg: getattr(cfg, heads)
  return Layout(
    lambda x, cfg: x.T.reshape(cfg.hidden_size, n(cfg), cfg.head_dim),
    lambda x, cfg: x.reshape(cfg.hidden_size, n(cfg) * cfg.head_dim).T,
  )


def _bias_heads(heads: str) -> Layout:
  n = lambda cfg: getattr(cfg, heads)
  return Layout(lambda x, cfg: x.reshape(n(cfg), cfg.head_dim), lambda x, cfg: x.reshape(-1))


IDENTITY = Layout(_same, _same)
TRANSPOSE = Layout(_t, _t)
OUT_HEADS = Layout(  # o_proj: `[hidden, heads*head_dim]` <-> `[heads, head_dim, hidden]`
  lambda x, cfg: x.T.reshape(cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size),
  lambda x, cfg: x.reshape(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size).T,
)

# Per-layer parameters: our path inside a decoder layer -> (HF name inside `model.layers.{i}.`, layout).
# `{e}` marks per-expert tensors, stacked on our expert axis.
LAYER_PARAMS: dict[tuple[str, ...], tuple[str, Layout]] = {
  ("input_layernorm", "weight"): ("input_layernorm.weight", IDENTITY),
  ("post_attention_layernorm", "weight"): ("post_attention_layernorm.weight", IDENTITY),
  ("self_attn", "q_proj"): ("self_attn.q_proj.weight", _in_heads("num_attention_heads")),
  ("self_attn", "k_proj"): ("self_attn.k_proj.weight", _in_heads("num_key_value_heads")),
  ("self_attn", "v_proj"): ("self_attn.v_proj.weight", _in_heads("num_key_value_heads")),
  ("self_attn", "o_proj"): ("self_attn.o_proj.weight", OUT_HEADS),
  ("self_attn", "q_bias"): ("self_attn.q_proj.bias", _bias_heads("num_attention_heads")),
  ("self_attn", "k_bias"): ("self_attn.k_proj.bias", _bias_heads("num_key_value_heads")),
  ("self_attn", "v_bias"): ("self_attn.v_proj.bias", _bias_heads("num_key_value_heads")),
  ("self_attn", "o_bias"): ("self_attn.o_proj.bias", IDENTITY),
  ("self_attn", "q_norm", "weight"): ("self_attn.q_norm.weight", IDENTITY),
  ("self_attn", "k_norm", "weight"): ("self_attn.k_norm.weight", IDENTITY),
  ("mlp", "gate_proj"): ("mlp.gate_proj.weight", TRANSPOSE),
  ("mlp", "up_proj"): ("mlp.up_proj.weight", TRANSPOSE),
  ("mlp", "down_proj"): ("mlp.down_proj.weight", TRANSPOSE),
  ("mlp", "router"): ("mlp.gate.weight", TRANSPOSE),
}
EXPERT_PARAMS: dict[tuple[str, ...], tuple[str, Layout]] = {
  ("mlp", "gate_proj"): ("mlp.experts.{e}.gate_proj.weight", TRANSPOSE),
  ("mlp", "up_proj"): ("mlp.experts.{e}.up_proj.weight", TRANSPOSE),
  ("mlp", "down_proj"): ("mlp.experts.{e}.down_proj.weight", TRANSPOSE),
}
TOP_PARAMS: dict[tuple[str, ...], tuple[str, Layout]] = {
  ("embed_tokens",): ("model.embed_tokens.weight", IDENTITY),
  ("norm", "weight"): ("model.norm.weight", IDENTITY),
  ("lm_head",): ("lm_head.weight", TRANSPOSE),
}
# HF keys that are not weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class ParamSource:
  """Where one of our variables comes from: a top-level tensor, or one tensor per layer (and expert)."""

  path: tuple[str, ...]
  layout: Layout
  hf_key: str | None = None  # top-level
  layer_keys: tuple[str, ...] | None = None  # per stacked layer; may contain "{e}"
  num_experts: int = 0

  def hf_keys(self) -> list[str]:
    if self.hf_key is not None:
      return [self.hf_key]
    keys = list(self.layer_keys)
    if self.num_experts:
      keys = [k.format(e=e) for k in keys for e in range(self.num_experts)]
    return keys


def param_sources(cfg: Qwen3Config) -> list[ParamSource]:
  """Every variable of `Qwen3(cfg)` with its HF origin, in a stable order."""
  out = []
  for path, (key, layout) in TOP_PARAMS.items():
    if path == ("lm_head",) and cfg.tie_word_embeddings:
      continue
    out.append(ParamSource(path, layout, hf_key=key))
  for kind in ("dense", "moe"):
    layers = [i for i, k in enumerate(cfg.layer_kinds) if k == kind]
    if not layers:
      continue
    for sub, (key, layout) in LAYER_PARAMS.items():
      if sub[0] == "self_attn" and sub[1].endswith("_bias") and not cfg.attention_bias:
        continue
      if sub[0] == "mlp" and (sub[1] == "router") != (kind == "moe"):
        continue
      if sub[0] == "mlp" and kind == "moe" and sub[1] != "router":
        continue
      out.append(
        ParamSource((f"{kind}_layers",) + sub, layout, layer_keys=tuple(f"model.layers.{i}.{key}" for i in layers))
      )
    if kind == "moe":
      for sub, (key, layout) in EXPERT_PARAMS.items():
        out.append(
          ParamSource(
            (f"{kind}_layers",) + sub,
            layout,
            layer_keys=tuple(f"model.layers.{i}.{key}" for i in layers),
            num_experts=cfg.num_experts,
          )
        )
  return out


def _checkpoint_dtype(hf: dict) -> str:
  name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
  return {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(str(name), "float32")


def abstract_model(cfg: Qwen3Config) -> tuple[nnx.GraphDef, nnx.State]:
  return nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))


def load_hf(hf_dir, *, dtype=None, mesh: jax.sharding.Mesh | None = None, **config_overrides) -> Qwen3:
  """Loads a local HF Qwen3 / Qwen3-MoE folder into a model, placing each tensor on its shards as it is read.

  `dtype` (e.g. "bfloat16") sets both the parameter and the compute dtype; by default the checkpoint's own.
  """
  hf_dir = os.fspath(hf_dir)
  config_path = os.path.join(hf_dir, "config.json")
  with open(config_path) as f:
    hf_config = json.load(f)
  dtype_name = jnp.dtype(dtype).name if dtype is not None else _checkpoint_dtype(hf_config)
  cfg = Qwen3Config.from_hf(hf_config, **{"param_dtype": dtype_name, "dtype": dtype_name, **config_overrides})
  return load_tensors(SafetensorsDir(hf_dir), cfg, mesh=mesh, config_path=config_path)


def load_tensors(
  tensors,
  cfg: Qwen3Config,
  mesh: jax.sharding.Mesh | None = None,
  strict: bool = True,
  config_path: str = "the config",
) -> Qwen3:
  """Builds a model from any `get(key) -> np.ndarray` tensor source holding HF keys."""
  graphdef, abstract = abstract_model(cfg)
  sources = {s.path: s for s in param_sources(cfg)}
  flat = dict(nnx.to_flat_state(abstract))
  if set(flat) != set(sources):
    raise AssertionError(f"parameter table out of date: {set(flat) ^ set(sources)}")
  if strict:
    check_tensors(tensors, cfg, config_path)
  shardings = sharding_lib.state_shardings(abstract, mesh) if mesh is not None else None
  flat_shardings = {p: v.get_value() for p, v in nnx.to_flat_state(shardings)} if shardings is not None else {}
  values = {}
  for path, var in flat.items():
    src = sources[path]
    target = np.dtype(var.get_value().dtype)
    shape = tuple(var.get_value().shape)
    sharding = flat_shardings.get(path)
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    reader = functools.lru_cache(maxsize=None)(
      lambda idx, _s=src, _t=target, _sh=shape: _read_slice(tensors, _s, cfg, _sh, _t, idx)
    )
    arr = jax.make_array_from_callback(shape, sharding, lambda index: reader(_hashable(index)))
    values[path] = arr
  state = nnx.from_flat_state({p: flat[p].replace(values[p]) for p in flat})
  return nnx.merge(graphdef, state)


def _hashable(index: tuple[slice, ...]):
  return tuple((s.start, s.stop, s.step) for s in index)


def _read_slice(tensors, src: ParamSource, cfg, shape, dtype, index) -> np.ndarray:
  index = tuple(slice(*s) for s in index)
  if src.hf_key is not None:
    return _convert(tensors, src.hf_key, src, cfg, shape, dtype)[index]
  layer_range = range(len(src.layer_keys))[index[0]]
  rest = index[1:]
  layers = []
  for li in layer_range:
    key = src.layer_keys[li]
    if src.num_experts:
      expert_range = range(src.num_experts)[rest[0]]
      layers.append(
        np.stack([_convert(tensors, key.format(e=e), src, cfg, shape[2:], dtype)[rest[1:]] for e in expert_range])
      )
    else:
      layers.append(_convert(tensors, key, src, cfg, shape[1:], dtype)[rest])
  return np.stack(layers)


def _convert(tensors, key, src: ParamSource, cfg, want_shape, dtype) -> np.ndarray:
  x = tensors.get(key)
  try:
    y = src.layout.to_ours(x, cfg)
  except ValueError:
    y = None
  if y is None or tuple(y.shape) != tuple(want_shape):
    where = tensors.file_of(key) if hasattr(tensors, "file_of") else "checkpoint"
    raise SafetensorsError(
      f"{where}: tensor {key!r} has shape {tuple(x.shape)}, which does not fit "
      f"the config (expected {want_shape} after layout conversion)"
    )
  return np.asarray(y).astype(dtype)


def _shape_after(fn: Callable, shape: tuple[int, ...], cfg: Qwen3Config) -> tuple[int, ...]:
  # A zero-strided stand-in: the layout functions only reshape and transpose, so nothing is allocated.
  return tuple(fn(np.broadcast_to(np.zeros((), np.uint8), shape), cfg).shape)


def hf_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
  """Every hub key of `cfg` with its `[out, in]` shape, in the order `hf_tensors` yields them."""
  _, abstract = abstract_model(cfg)
  ours = {path: tuple(v.get_value().shape) for path, v in nnx.to_flat_state(abstract)}
  out = {}
  for src in param_sources(cfg):
    shape = ours[src.path]
    per_tensor = shape if src.hf_key is not None else shape[2:] if src.num_experts else shape[1:]
    out.update({key: _shape_after(src.layout.to_hf, per_tensor, cfg) for key in src.hf_keys()})
  return out


def _where(tensors, key: str) -> str:
  return tensors.file_of(key) if hasattr(tensors, "file_of") else getattr(tensors, "dir", "checkpoint")


def check_tensors(tensors, cfg: Qwen3Config, config_path: str = "the config") -> dict[str, tuple[int, ...]]:
  """Checks the names and shapes of a `get`/`keys` tensor source against `cfg`; returns the expected shapes."""
  expected = hf_shapes(cfg)
  have = set(tensors.keys())
  if cfg.tie_word_embeddings:
    have.discard("lm_head.weight")  # tied checkpoints may still carry a copy
  where = getattr(tensors, "dir", "checkpoint")
  missing = sorted(set(expected) - have)
  if missing:
    raise SafetensorsError(
      f"{where}: {len(missing)} tensor(s) that {config_path} needs are missing, e.g. {missing[:3]}"
    )
  unknown = sorted(k for k in have - set(expected) if not k.endswith(IGNORED_SUFFIXES))
  if unknown:
    raise SafetensorsError(
      f"{_where(tensors, unknown[0])}: unknown tensor {unknown[0]!r} for the model in "
      f"{config_path} ({len(unknown)} unknown in all)"
    )
  for key, shape in expected.items():
    got = tuple(tensors.shape(key) if hasattr(tensors, "shape") else tensors.get(key).shape)
    if got != shape:
      raise SafetensorsError(
        f"{_where(tensors, key)}: tensor {key!r} has shape {got}, but {config_path} "
        f"implies {shape}; the config does not match the checkpoint"
      )
  return expected


def hf_tensors(state: nnx.State | Qwen3, cfg: Qwen3Config, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
  """Streams `(hf_key, array)` in the hub layout, one tensor (layer / expert) at a time."""
  if isinstance(state, nnx.Module):
    state = nnx.state(state)
  flat = dict(nnx.to_flat_state(state))
  for src in param_sources(cfg):
    var = flat[src.path]
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    if src.hf_key is not None:
      yield src.hf_key, _to_host(src.layout.to_hf(_fetch(value), cfg), dtype)
      continue
    for li, key in enumerate(src.layer_keys):
      layer = _fetch(value[li])
      if src.num_experts:
        for e in range(src.num_experts):
          yield key.format(e=e), _to_host(src.layout.to_hf(layer[e], cfg), dtype)
      else:
        yield key, _to_host(src.layout.to_hf(layer, cfg), dtype)


def _fetch(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def _to_host(x: np.ndarray, dtype) -> np.ndarray:
  x = np.ascontiguousarray(x)
  return x if dtype is None else x.astype(jnp.dtype(dtype))
