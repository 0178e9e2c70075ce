"""Per-call resource limits and the result of one sandboxed call."""

from __future__ import annotations

import dataclasses
from typing import Any

from retool_jax.fields import check_fields, field_names

STATUSES = ("ok", "error", "timeout", "memory", "killed", "policy")


@dataclasses.dataclass(frozen=True)
class Limits:
  """Limits applied to every call.

  Attributes:
    timeout_s: wall-clock limit of one call (one cell in a session).
    cpu_s: CPU-time limit of one call; defaults to ``timeout_s``.
    memory_mb: memory the code may allocate on top of the warm interpreter (address space).
    max_output_bytes: output kept per call; beyond it the head and tail are kept with a marker.
    head_fraction: share of ``max_output_bytes`` given to the head.
    max_procs: processes the call may create (the kernel's RLIMIT_NPROC for non-root users; for
      root, which that limit does not bind, the worker counts them and kills the call).
    max_file_mb: largest file the call may write.
    max_open_files: open file descriptors.
    scratch_mb: size of the private scratch filesystem (bwrap backend).
    session_cpu_s: CPU budget of a whole session (its interpreter lives across calls).
  """

  timeout_s: float = 10.0
  cpu_s: float | None = None
  memory_mb: int = 1024
  max_output_bytes: int = 8192
  head_fraction: float = 0.5
  max_procs: int = 32
  max_file_mb: int = 64
  max_open_files: int = 256
  scratch_mb: int = 256
  session_cpu_s: float = 300.0

  def __post_init__(self):
    for field in ("timeout_s", "memory_mb", "max_procs", "max_file_mb", "max_open_files", "scratch_mb"):
      if getattr(self, field) <= 0:
        raise ValueError(f"Limits.{field} must be positive, got {getattr(self, field)!r}")
    if self.cpu_s is not None and self.cpu_s <= 0:
      raise ValueError(f"Limits.cpu_s must be positive, got {self.cpu_s!r}")
    if self.max_output_bytes < 0:
      raise ValueError(f"Limits.max_output_bytes must be >= 0, got {self.max_output_bytes!r}")
    if not 0.0 <= self.head_fraction <= 1.0:
      raise ValueError(f"Limits.head_fraction must be in [0, 1], got {self.head_fraction!r}")

  def replace(self, **overrides: Any) -> Limits:
    """A copy with the given fields changed; ``None`` values are ignored."""
    check_fields(overrides, field_names(self), "Limits", error=TypeError)
    return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

  def to_wire(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ExecResult:
  """The outcome of one sandboxed call.

  ``status`` is one of ``ok``, ``error`` (the code raised or exited non-zero), ``timeout``
  (wall or CPU time), ``memory``, ``killed`` (a signal, too many processes, or the sandbox itself failed) and
  ``policy`` (a module outside the allow-list). ``output`` is stdout and stderr interleaved.
  """

  status: str
  output: str
  elapsed_s: float = 0.0
  backend: str = ""
  truncated_bytes: int = 0

  @property
  def ok(self) -> bool:
    return self.status == "ok"
