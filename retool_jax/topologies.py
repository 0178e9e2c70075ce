"""TPU slice names users type (`v5p-8`, `v5e-16`, ...) -> the topology libtpu compiles for, and HBM per chip.

v4 and v5p slice names count TensorCores (two per chip: `v5p-8` is 4 chips), v5e and v6e names count chips.
`get_topology_desc` accepts `<generation>:<chip grid>`, e.g. `v5p:2x2x1` or `v5e:2x4`; that form may also be
passed directly where a slice name is expected.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os

from jax.experimental import topologies as jax_topologies

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # what users type, e.g. "v5p-8"
  topology: str  # libtpu's name, e.g. "v5p:2x2x1"
  chips: int
  hbm_bytes_per_chip: int

  @property
  def generation(self) -> str:
    return self.topology.split(":")[0]


# generation -> (HBM GiB per chip, TensorCores counted per chip in slice names, chip grids by chip count)
_GENERATIONS: dict[str, tuple[float, int, dict[int, str]]] = {
  "v4": (32, 2, {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}),
  "v5p": (95.74, 2, {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}),
  "v5e": (16, 1, {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}),
  "v6e": (32, 1, {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}),
}

TOPOLOGIES: dict[str, Topology] = {
  f"{gen}-{chips * per_chip}": Topology(f"{gen}-{chips * per_chip}", f"{gen}:{grid}", chips, int(hbm * GiB))
  for gen, (hbm, per_chip, grids) in _GENERATIONS.items()
  for chips, grid in grids.items()
}


def get(name: str) -> Topology:
  """The slice `name` (`v5p-8`) or a libtpu topology string (`v5p:2x2x1`); ValueError naming the known ones."""
  if name in TOPOLOGIES:
    return TOPOLOGIES[name]
  gen, sep, grid = name.partition(":")
  if sep and gen in _GENERATIONS and grid and all(p.isdigit() and int(p) > 0 for p in grid.split("x")):
    hbm, _, _ = _GENERATIONS[gen]
    return Topology(name, name, math.prod(int(p) for p in grid.split("x")), int(hbm * GiB))
  raise ValueError(
    f"unknown TPU topology {name!r}; known slice names: {', '.join(TOPOLOGIES)} "
    f"(or a libtpu topology such as 'v5p:2x2x1')"
  )


def devices(topo: Topology) -> list:
  """The topology's abstract devices (needs libtpu; compiles only, nothing runs)."""
  # Compiling needs no TPU, so several processes (parallel checks, tests) may hold libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not has_tpu_chips():
    compile_only_env(topo)

  return list(jax_topologies.get_topology_desc(topology_name=topo.topology, platform="tpu").devices)


def has_tpu_chips() -> bool:
  """Whether this host has TPU chips (their device files, as the TPU runtime finds them)."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def compile_only_env(topo: Topology) -> None:
  """On a host without TPU chips libtpu only compiles, yet it looks up the slice's accelerator type and worker
  hostnames (a TPU VM's metadata) and warns when they are missing; give it a single-host answer instead.
  Values already set win."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.name)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def hbm_bytes_per_device(topo: Topology, num_devices: int) -> int:
  """HBM one compiled device sees: v4 topologies list each TensorCore as a device (half a chip's HBM)."""
  return topo.hbm_bytes_per_chip * topo.chips // max(num_devices, 1)
