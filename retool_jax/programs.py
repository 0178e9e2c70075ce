"""A run's compiled programs, described abstractly so that they can be compiled ahead of time.

Trainers and engines list the programs a run executes as `Program`s (a jitted function and the
`jax.ShapeDtypeStruct` arguments, shardings included, it is called with); `retool_jax.aot` compiles them for a
topology without the hardware.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Program:
  name: str
  fn: Callable[..., Any]  # a `jax.jit`-wrapped function
  args: tuple[Any, ...]  # pytrees of `jax.ShapeDtypeStruct` (with `.sharding`) or static Python values
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Pytrees of `jax.ShapeDtypeStruct` (with shardings) that stay in device memory while this program runs
  # without being its arguments (e.g. the train state while the rollout engine decodes).
  resident: tuple[Any, ...] = ()

  def lower(self):
    return self.fn.lower(*self.args, **self.kwargs)


def resident_bytes(program: Program) -> int:
  """Bytes one device holds for `program.resident` (each array's shard; replicated arrays in full)."""
  total = 0
  for x in jax.tree.leaves(program.resident):
    if not isinstance(x, jax.ShapeDtypeStruct):
      continue
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    try:
      itemsize = np.dtype(x.dtype).itemsize
    except TypeError:  # a typed PRNG key
      data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
      itemsize = math.prod(data.shape) * np.dtype(data.dtype).itemsize
    total += math.prod(shape) * itemsize
  return total
