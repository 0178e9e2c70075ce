"""Abstract (shape-only) models and train states with their shardings, for ahead-of-time compilation.

Nothing here allocates device memory: shapes come from `nnx.eval_shape` / `jax.eval_shape` and every leaf is a
`jax.ShapeDtypeStruct` carrying the `NamedSharding` the run gives it, so `jax.jit(...).lower(...)` sees exactly
the arguments the trainer passes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding

from retool_jax import sharding as sharding_lib
from retool_jax.checkpoint import layout
from retool_jax.models.qwen3 import Qwen3
from retool_jax.models.qwen3_config import Qwen3Config, preset
from retool_jax.train import lora as lora_lib
from retool_jax.train import state as state_lib
from retool_jax.train.build import EXECUTION


def _checkpoint_config(path: Path) -> Qwen3Config:
  if (path / "config.json").exists():
    return Qwen3Config.from_hf(path / "config.json")
  return layout.config_from_record(layout.read_config(path), where=str(path))


def model_config(m: ml_collections.ConfigDict) -> Qwen3Config:
  """The architecture and execution policy a run of `m` (a `config.model` group) builds, without weights.

  From `m.checkpoint` when it is on this machine, else from `m.preset` (with `m.overrides`): the AOT check
  needs the architecture, not the weights.
  """
  execution = {k: m[k] for k in EXECUTION if k in m}
  overrides = dict(m.overrides) if "overrides" in m else {}
  checkpoint = m.get("checkpoint", "")
  if checkpoint and os.path.exists(checkpoint):
    return _checkpoint_config(Path(checkpoint)).replace(**{**execution, **overrides})
  if m.get("preset", ""):
    return preset(m.preset, **{**execution, **overrides})
  if overrides and not checkpoint:
    try:
      return Qwen3Config(**{**execution, **overrides})
    except TypeError as e:
      raise ValueError(f"model.overrides must give the whole architecture ({e})") from None
  where = f"model.checkpoint={checkpoint!r} is not on this machine" if checkpoint else "model.checkpoint is empty"
  raise ValueError(f"{where}: set model.preset (e.g. --config.model.preset=4B) to describe the architecture")


def with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def abstract_module(constructor: Callable[[], nnx.Module], mesh) -> nnx.Module:
  """`constructor()`'s module with `ShapeDtypeStruct` variables sharded by the logical-axis table."""
  abstract = nnx.eval_shape(constructor)
  graphdef, state = nnx.split(abstract)
  shardings = sharding_lib.state_shardings(state, mesh)
  state = jax.tree.map(
    lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s.get_value())),
    state,
    shardings,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return nnx.merge(graphdef, state)


def abstract_model(cfg: Qwen3Config, mesh) -> Qwen3:
  return abstract_module(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)), mesh)


def abstract_train_state(
  model: nnx.Module,
  tx: optax.GradientTransformation,
  mesh,
  *,
  lora_config: lora_lib.LoraConfig | None = None,
) -> tuple[state_lib.TrainState, state_lib.TrainState]:
  """`(state, shardings)`: the `TrainState` `create_train_state` would build on `mesh`, as ShapeDtypeStructs
  with shardings, and its tree of NamedShardings (for `jax.jit` in/out shardings)."""
  abstract = jax.eval_shape(
    lambda m: state_lib.TrainState.create(m, tx, jax.random.key(0), lora_config=lora_config), model
  )
  shardings = state_lib.state_shardings(abstract, mesh, state_lib.param_shardings(model, mesh))
  return with_shardings(abstract, shardings), shardings


def batch(shape: tuple[int, ...], dtype, mesh, *, sharded: bool = True) -> jax.ShapeDtypeStruct:
  """A `[batch, ...]` input: batch over the data axes when they divide it, else replicated."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if sharded and shape[0] % shards == 0:
    sh = sharding_lib.data_sharding(mesh, len(shape))
  else:
    sh = NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
