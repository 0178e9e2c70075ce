"""A run's compiled programs, described abstractly so that they can be compiled ahead of time.

Trainers and engines list the programs a run executes as `Program`s (a jitted function and the
`jax.ShapeDtypeStruct` arguments, shardings included, it is called with); `retool_jax.aot` compiles them for a
topology without the hardware.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Program:
  name: str
  fn: Callable[..., Any]  # a `jax.jit`-wrapped function
  args: tuple[Any, ...]  # pytrees of `jax.ShapeDtypeStruct` (with `.sharding`) or static Python values
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

  def lower(self):
    return self.fn.lower(*self.args, **self.kwargs)
