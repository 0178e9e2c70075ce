"""Device mesh, logical-axis rules and sharded model creation.

Every parameter and the main activations carry *logical* axis names (`("vocab", "embed")`); one table maps each
logical name to the mesh axes that shard it. Change the table, not the model, to change the layout.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axes that shard it (None: replicated).
LOGICAL_AXIS_RULES: Mapping[str, str | tuple[str, ...] | None] = {
  # Parameters.
  "layers": None,  # leading axis of stacked decoder layers
  "vocab": "tensor",  # embedding rows, lm_head columns
  "embed": "fsdp",  # model width: fully-sharded data parallel over this axis
  "q_heads": "tensor",
  "kv_heads": "tensor",
  "head_dim": None,
  "mlp": "tensor",  # dense SwiGLU width
  "expert": "expert",  # expert index of MoE weights
  "expert_mlp": "tensor",  # per-expert SwiGLU width
  "norm": None,
  "router_expert": None,  # router columns: replicated so top-k needs no gather
  # Activations.
  "batch": ("data", "fsdp"),
  "length": None,
  "act_embed": None,
  "act_heads": "tensor",
  "act_kv_heads": "tensor",
  "act_mlp": "tensor",
  "act_vocab": "tensor",
  "cache_length": None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the four mesh axes; one of them may be -1 to take the remaining devices."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  expert: int = 1

  def shape(self, num_devices: int) -> tuple[int, ...]:
    sizes = [self.data, self.fsdp, self.tensor, self.expert]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
      raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if free:
      if num_devices % known:
        raise ValueError(f"{num_devices} devices cannot fill mesh {dict(zip(MESH_AXES, sizes))}")
      sizes[free[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(
  data: int = 1, fsdp: int = -1, tensor: int = 1, expert: int = 1, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor, expert) mesh over all (or the given) devices."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = MeshConfig(data, fsdp, tensor, expert).shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(
  axes: Sequence[str | None],
  shape: Sequence[int] | None = None,
  mesh: jax.sharding.Mesh | None = None,
  rules: Mapping[str, Any] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec.

  With a mesh and shape, a dimension whose size is not divisible by its mesh axes is replicated instead
  (e.g. 2 KV heads on a tensor axis of 4), and a mesh axis is never used twice.
  """
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    mesh_axes = rules.get(name) if name is not None else None
    if mesh_axes is None:
      out.append(None)
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    if mesh is not None:
      mesh_axes = tuple(a for a in mesh_axes if a in mesh.shape and mesh.shape[a] > 1)
      if shape is not None and mesh_axes and shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
        mesh_axes = ()
    used.update(mesh_axes)
    out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*out)


def _current_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical axes under the current mesh (a no-op without one)."""
  mesh = _current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def _variable_spec(var: nnx.Variable, mesh) -> PartitionSpec:
  axes = tuple(var.get_metadata().get("axes") or ())
  shape = var.get_value().shape
  if len(axes) == len(shape) - 1:
    axes = ("layers",) + axes  # stacked decoder layers
  if len(axes) != len(shape):
    return PartitionSpec()
  return logical_to_spec(axes, shape, mesh)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
  """A NamedSharding for each variable of an (abstract) nnx state, from its `axes` metadata."""
  return jax.tree.map(
    lambda v: v.replace(NamedSharding(mesh, _variable_spec(v, mesh))),
    state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def create_sharded(constructor: Callable[[], nnx.Module], mesh: jax.sharding.Mesh | None) -> nnx.Module:
  """Builds a module directly into its shards: shapes via `nnx.eval_shape`, values by a jitted init whose
  out_shardings come from the logical-axis table, so no device ever holds a full copy first."""
  if mesh is None:
    return constructor()
  abstract = nnx.eval_shape(constructor)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh)

  def init():
    return nnx.state(constructor())

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def shard_module(module: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
  """Moves an existing module's variables onto `mesh` following the logical-axis table."""
  graphdef, state = nnx.split(module)
  shardings = state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  return nnx.merge(graphdef, state)


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` on multi-host runs (TPU pods, multi-node GPU); a no-op on one host.

  TPU pods, SLURM and Open MPI are detected by JAX itself; elsewhere set JAX_COORDINATOR_ADDRESS (host:port of
  process 0) with JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host. RETOOL_HEARTBEAT_TIMEOUT_S (default
  JAX's 100 s) is how long a silent process counts as alive: raise it when processes share a busy machine.
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = {}
    for arg, var in (
      ("num_processes", "JAX_NUM_PROCESSES"),
      ("process_id", "JAX_PROCESS_ID"),
      ("heartbeat_timeout_seconds", "RETOOL_HEARTBEAT_TIMEOUT_S"),
    ):
      if env.get(var):
        try:
          kwargs[arg] = int(env[var])
        except ValueError:
          raise ValueError(f"{var}={env[var]!r} is not an integer") from None
    jax.distributed.initialize(**kwargs)  # JAX reads the coordinator address from the environment
    return
  cluster_env = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
  if any(env.get(k) for k in cluster_env):
    jax.distributed.initialize()


def data_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a `[batch, ...]` input array: batch over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), None, mesh))
