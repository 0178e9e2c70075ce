"""Multi-host helpers: rows produced on each host, gathered so that every host holds the same global batch.

A gather function takes a pytree of numpy arrays, of the same shapes and dtypes on every host, and returns each
stacked along a new leading host axis, in host order: `jax.experimental.multihost_utils.process_allgather`
on a multi-process run (`default_gather`); tests pass a simulated one. On one process there is nothing to
gather and `default_gather` returns None, so callers skip the exchange entirely.

Placement: a process may only place data onto its own devices, so values every host holds in full become global
arrays through `host_to_global` / `replicate` (each process fills its shards), never `jax.device_put` onto a
mesh spanning other processes; `to_local` / `ProcessLocalEngine` give a process its own copy of a sharded model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax._src import distributed
from jax.experimental import multihost_utils
from numpy.typing import DTypeLike

from retool_jax import sharding as sharding_lib

Gather = Callable[[Any], Any]

__all__ = [
  "Gather",
  "barrier",
  "Ragged",
  "default_gather",
  "gather_rows",
  "global_sum",
  "host_to_global",
  "mesh_of",
  "replicate",
]


def default_gather() -> Gather | None:
  """`process_allgather` when this run has several processes, else None (nothing to exchange)."""
  if jax.process_count() == 1:
    return None
  return multihost_utils.process_allgather


_barriers = 0


def barrier(name: str, timeout_s: float = 600.0) -> None:
  """Waits until every process gets here, through JAX's coordination service (a no-op on one process).

  Collectives between CPU processes (gloo) give up when a peer arrives more than 30 s later; processes that
  share a busy machine can drift that far apart (imports, compilation), so start-up meets here first.
  """
  global _barriers
  if jax.process_count() == 1:
    return
  _barriers += 1
  distributed.global_state.client.wait_at_barrier(f"retool_jax/{name}/{_barriers}", int(timeout_s * 1000))


def global_sum(value: int, gather: Gather) -> int:
  """The sum over hosts of an integer each host holds."""
  return int(np.sum(gather(np.asarray(value, np.int32))))


class Ragged(NamedTuple):
  """Rows of different lengths: their values end to end (1-D, of one dtype) and each row's length."""

  values: np.ndarray
  lengths: np.ndarray

  @classmethod
  def from_rows(cls, rows: Sequence[Any], dtype: DTypeLike) -> Ragged:
    lengths = np.asarray([len(row) for row in rows], np.int64)
    values = np.concatenate([np.asarray(row, dtype) for row in rows]) if rows else np.zeros(0, dtype)
    return cls(values.astype(dtype, copy=False), lengths)

  def __len__(self) -> int:
    return len(self.lengths)

  def rows(self) -> list[np.ndarray]:
    return np.split(self.values, np.cumsum(self.lengths)[:-1]) if len(self.lengths) else []


def gather_rows(fields: Mapping[str, np.ndarray | Ragged], gather: Gather) -> dict[str, np.ndarray | Ragged]:
  """Every host's rows of `fields`, host after host, on every host.

  A field is an array whose first dimension is the row, or `Ragged` rows of any lengths (token ids, masks,
  ...); every field holds the same number of rows on a host, and each field has the same dtype (and trailing
  shape) on every host. Hosts may hold different numbers of rows and rows of different lengths: a first
  gather agrees on the padded sizes, the second moves the padded fields as raw bytes (so every dtype, float64
  included, comes back bit for bit), and the padding is dropped again.
  """
  counts = {name: len(field) for name, field in fields.items()}
  if len(set(counts.values())) > 1:
    raise ValueError(f"fields hold different numbers of rows: {counts}")
  sizes = {name: len(field.values) if isinstance(field, Ragged) else len(field) for name, field in fields.items()}
  local = np.asarray([next(iter(counts.values()), 0), *sizes.values()], np.int32)
  # most rows, most values of each field, over hosts (at least one: no zero-sized transfers)
  padded_to = np.maximum(np.asarray(gather(local)).max(axis=0), 1)
  rows = int(padded_to[0])

  padded: dict[str, np.ndarray] = {"_count": np.asarray([local[0]], np.int64)}
  for (name, field), size in zip(fields.items(), padded_to[1:]):
    data = field.values if isinstance(field, Ragged) else np.asarray(field)
    out = np.zeros((int(size), *data.shape[1:]), data.dtype)
    out[: len(data)] = data
    padded[name] = out
    if isinstance(field, Ragged):
      padded[f"_lengths/{name}"] = np.zeros(rows, np.int64)
      padded[f"_lengths/{name}"][: len(field)] = field.lengths
  layouts = {name: (out.dtype, out.shape) for name, out in padded.items()}
  received = gather({name: np.ascontiguousarray(out).reshape(-1).view(np.uint8) for name, out in padded.items()})

  def per_host(name: str) -> np.ndarray:
    dtype, shape = layouts[name]
    data = np.asarray(received[name])
    return data.reshape(data.shape[0], -1).view(dtype).reshape(data.shape[0], *shape)

  count = per_host("_count")[:, 0]
  out: dict[str, np.ndarray | Ragged] = {}
  for name, field in fields.items():
    data = per_host(name)
    if isinstance(field, Ragged):
      lengths = per_host(f"_lengths/{name}")
      out[name] = Ragged(
        np.concatenate([data[h, : lengths[h, : count[h]].sum()] for h in range(len(count))]),
        np.concatenate([lengths[h, : count[h]] for h in range(len(count))]),
      )
    else:
      out[name] = np.concatenate([data[h, : count[h]] for h in range(len(count))])
  return out


def mesh_of(tree: Any) -> jax.sharding.Mesh:
  """The mesh the arrays of `tree` are laid out on (the first `NamedSharding` found)."""
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return sharding.mesh
  raise ValueError("no array of the tree is laid out on a mesh (NamedSharding)")


def host_to_global(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """A value every host holds in full (numpy, a local `jax.Array`, a typed PRNG key) as a global array laid
  out by `sharding`; each process fills only its own devices (`jax.device_put` cannot place onto devices of
  other processes)."""
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    impl = jax.random.key_impl(x)
    data = np.asarray(jax.random.key_data(x))
    trailing = (None,) * (data.ndim - x.ndim)
    spec = jax.sharding.PartitionSpec(*tuple(sharding.spec), *trailing)
    data_sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
    data = jax.make_array_from_callback(data.shape, data_sharding, lambda index: data[index])
    return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl), out_shardings=sharding)(data)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Host arrays that are the same on every host, as global arrays replicated over `mesh`."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: host_to_global(x, sharding), tree)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole value of a (possibly sharded over processes) array, on every host."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  """A mesh of this process's own devices, sharded like `mesh` where its axes fit (the rest goes to fsdp)."""
  devices = jax.local_devices()
  tensor = mesh.shape["tensor"] if len(devices) % mesh.shape["tensor"] == 0 else 1
  return sharding_lib.make_mesh(data=1, fsdp=-1, tensor=tensor, expert=1, devices=devices)


def to_local(module: Any, mesh: jax.sharding.Mesh) -> Any:
  """A copy of an NNX module whose arrays live on the process-local `mesh` (from `local_mesh`), laid out by the
  logical-axis table: what a process runs on its own, e.g. an embedded rollout engine serving its prompts."""
  graphdef, state = nnx.split(module)
  shardings = sharding_lib.state_shardings(state, mesh)
  values = jax.tree.map(lambda x: to_host(x) if isinstance(x, jax.Array) else x, state)
  return nnx.merge(graphdef, jax.device_put(values, shardings))


class ProcessLocalEngine:
  """An embedded engine of one process on a multi-process run: it serves this process's rollouts on the
  process's own devices, and `update_weights` brings the globally sharded policy over (every process calls it
  at the same point, since gathering a sharded weight is collective)."""

  def __init__(self, engine_factory: Callable[[Any], Any], model: Any, mesh: jax.sharding.Mesh):
    self.mesh = local_mesh(mesh)
    self.engine = engine_factory(to_local(model, self.mesh))

  async def generate(self, requests: Any) -> Any:
    return await self.engine.generate(requests)

  async def update_weights(self, model: Any, version: Any = None) -> Any:
    return await self.engine.update_weights(to_local(model, self.mesh), version=version)

  def __getattr__(self, name: str) -> Any:  # the wrapped engine's other methods and attributes
    if name in ("engine", "mesh"):
      raise AttributeError(name)
    return getattr(self.engine, name)
