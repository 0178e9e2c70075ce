"""The Orbax checkpoint layout shared by converted models and training checkpoints.

A checkpoint is one Orbax composite folder (what `orbax.checkpoint.CheckpointManager` writes for each step):

    <dir>/params/   the model's nnx state as a pure dict, the same tree as `nnx.to_pure_dict(nnx.state(model))`
    <dir>/config/   JSON: {"format", "model": Qwen3Config fields, "hf_config", "generation_config"}

Training checkpoints add their own items (optimizer state, step, data position) beside these two. `load`
accepts such a folder or a CheckpointManager root (it then takes the latest step).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

from retool_jax import sharding as sharding_lib
from retool_jax.checkpoint import streaming
from retool_jax.models.qwen3 import Qwen3
from retool_jax.models.qwen3_config import Qwen3Config
from retool_jax.models.qwen3_hf import abstract_model

PARAMS_ITEM = "params"
CONFIG_ITEM = "config"
FORMAT = "retool_jax.qwen3.v1"


# ---- the config item ----------------------------------------------------------------------------


def config_record(
  cfg: Qwen3Config, hf_config: Mapping[str, Any] | None = None, generation_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """The JSON stored in the `config` item."""
  model = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
  return {
    "format": FORMAT,
    "model": model,
    "hf_config": dict(hf_config or cfg.to_hf()),
    "generation_config": dict(generation_config) if generation_config else None,
  }


def config_from_record(record: Mapping[str, Any], dtype=None, where: str = "checkpoint") -> Qwen3Config:
  """The model config of a `config` item; `dtype` replaces both the parameter and compute dtype."""
  if record.get("format") != FORMAT or "model" not in record:
    raise ValueError(f"{where}: not a retool_jax checkpoint config (format={record.get('format')!r})")
  fields = {f.name for f in dataclasses.fields(Qwen3Config)}
  unknown = set(record["model"]) - fields
  if unknown:
    raise ValueError(f"{where}: unknown config field(s) {sorted(unknown)}")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in record["model"].items()}
  if dtype is not None:
    name = np.dtype(dtype).name
    kwargs.update(param_dtype=name, dtype=name)
  return Qwen3Config(**kwargs)


# ---- locating a checkpoint ----------------------------------------------------------------------


def absolute(path: str | os.PathLike) -> epath.Path:
  """`path` made absolute (Orbax reads and writes absolute paths only); URLs such as gs://... are kept."""
  path = os.fspath(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


def resolve(path: str | os.PathLike) -> epath.Path:
  """The checkpoint folder at `path`: the folder itself, or the latest step of a CheckpointManager root."""
  path = absolute(path)
  if not path.exists():
    raise FileNotFoundError(f"no checkpoint at {path}")
  if (path / PARAMS_ITEM).is_dir():
    return path
  steps = [int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / PARAMS_ITEM).is_dir()]
  if steps:
    return path / str(max(steps))
  raise FileNotFoundError(f"{path}: not an Orbax checkpoint (no '{PARAMS_ITEM}' item and no step folders)")


def _checkpointer(params_handler: ocp.PyTreeCheckpointHandler | None = None) -> ocp.Checkpointer:
  registry = ocp.DefaultCheckpointHandlerRegistry()
  registry.add(PARAMS_ITEM, ocp.args.PyTreeSave, params_handler or ocp.PyTreeCheckpointHandler())
  registry.add(PARAMS_ITEM, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
  registry.add(CONFIG_ITEM, ocp.args.JsonSave, ocp.JsonCheckpointHandler())
  registry.add(CONFIG_ITEM, ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  """The `config` item of a checkpoint folder (or of the latest step under a CheckpointManager root)."""
  step = resolve(path)
  if not (step / CONFIG_ITEM).is_dir():
    raise FileNotFoundError(f"{step}: checkpoint has no '{CONFIG_ITEM}' item")
  return _checkpointer().restore(step, ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))[CONFIG_ITEM]


# ---- writing ------------------------------------------------------------------------------------


def _write(path, params: dict, record: dict, params_handler=None) -> None:
  path = absolute(path)
  if path.exists():
    raise FileExistsError(f"{path} already exists; choose a new destination or remove it")
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    _checkpointer(params_handler).save(
      path,
      ocp.args.Composite(**{PARAMS_ITEM: ocp.args.PyTreeSave(params), CONFIG_ITEM: ocp.args.JsonSave(record)}),
    )
  except BaseException:
    # Orbax writes into `<path>.orbax-checkpoint-tmp-*` and renames only on success; drop the leftovers.
    for tmp in path.parent.glob(path.name + ".orbax-checkpoint-tmp*"):
      tmp.rmtree(missing_ok=True)
    raise


def save(
  path: str | os.PathLike,
  model_or_state: Qwen3 | nnx.State,
  config: Qwen3Config,
  *,
  hf_config: Mapping[str, Any] | None = None,
  generation_config: Mapping[str, Any] | None = None,
) -> None:
  """Saves a (sharded) model's parameters and config; each process writes only its own shards."""
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
  _write(path, nnx.to_pure_dict(state), config_record(config, hf_config, generation_config))


def save_streamed(path: str | os.PathLike, params: dict, record: dict) -> None:
  """Saves a tree whose leaves may be `streaming.StreamedArray`s, writing each block as it is produced."""
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=streaming.type_handler_registry())
  _write(path, params, record, handler)


# ---- reading ------------------------------------------------------------------------------------


def _flat(tree: Mapping, prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def stored_params(step: epath.Path) -> dict[tuple[str, ...], Any]:
  """Orbax array metadata (name, shape, dtype) of each stored parameter, by path."""
  meta = _params_metadata(step)
  return _flat(meta.tree if hasattr(meta, "tree") else meta)


def _params_metadata(step: epath.Path) -> Any:
  # The params item alone: a trainer checkpoint's other items (optimizer, position) are none of this module's.
  return ocp.PyTreeCheckpointHandler().metadata(step / PARAMS_ITEM)


def check_matches(step, stored: dict, expected: dict) -> None:
  """Stored parameter names and shapes equal those the config implies (values: shapes or arrays)."""
  where = step / PARAMS_ITEM
  missing = sorted(set(expected) - set(stored))
  extra = sorted(set(stored) - set(expected))
  if missing or extra:
    raise ValueError(
      f"{where}: parameters do not match the config: missing {['/'.join(p) for p in missing]}, "
      f"unexpected {['/'.join(p) for p in extra]}"
    )
  for path, want in expected.items():
    got, want = tuple(stored[path].shape), tuple(getattr(want, "shape", want))
    if got != want:
      raise ValueError(f"{where}: parameter {'/'.join(path)} has shape {got}; the config expects {want}")


def load(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, dtype=None) -> Qwen3:
  """Restores a model straight onto its shards on `mesh` (one device without a mesh).

  Each process reads only the shards it holds. `dtype` (e.g. "bfloat16") casts the parameters on load and
  sets the compute dtype; by default the checkpoint's own.
  """
  step = resolve(path)
  cfg = config_from_record(read_config(step), dtype, where=os.fspath(step / CONFIG_ITEM))
  graphdef, abstract = abstract_model(cfg)
  target = nnx.to_pure_dict(abstract)
  check_matches(step, stored_params(step), _flat(target))
  if mesh is not None:
    shardings = nnx.to_pure_dict(sharding_lib.state_shardings(abstract, mesh))
  else:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: one, target)
  restore_args = jax.tree.map(
    lambda s, sh: ocp.ArrayRestoreArgs(sharding=sh, dtype=s.dtype, global_shape=s.shape), target, shardings
  )
  restored = _checkpointer().restore(
    step, ocp.args.Composite(**{PARAMS_ITEM: ocp.args.PyTreeRestore(item=target, restore_args=restore_args)})
  )[PARAMS_ITEM]
  nnx.replace_by_pure_dict(abstract, restored)
  return nnx.merge(graphdef, abstract)


class ParamReader:
  """Reads stored parameters, or slices of them, without restoring the whole tree (for export)."""

  def __init__(self, path: str | os.PathLike):
    self.step = resolve(path)
    self.stored = stored_params(self.step)
    self._context = ocp.type_handlers.get_ts_context(use_ocdbt=True)
    meta = _params_metadata(self.step)
    self._zarr3 = bool(getattr(meta, "use_zarr3", False))
    self._ocdbt = (self.step / PARAMS_ITEM / "manifest.ocdbt").exists()

  def open(self, param: tuple[str, ...]) -> ts.TensorStore:
    if param not in self.stored:
      raise KeyError(f"{self.step / PARAMS_ITEM}: no parameter {'/'.join(param)}")
    meta = self.stored[param]
    info = ocp.type_handlers.ParamInfo(
      name=meta.name, parent_dir=self.step / PARAMS_ITEM, use_zarr3=self._zarr3, ts_context=self._context
    )
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
    return ts.open(ts.Spec(spec), open=True, context=self._context).result()
