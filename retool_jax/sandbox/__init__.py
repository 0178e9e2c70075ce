"""An isolated, fast Python interpreter for tool calls.

Backends: ``bwrap`` (bubblewrap namespaces, chosen automatically where it works), ``process``
(rlimits, sessions and process-group cleanup only) and ``remote`` (a SandboxFusion-compatible
``/run_code`` service).
"""

from retool_jax.sandbox.backends import (
  BwrapBackend,
  BwrapProbe,
  ProcessBackend,
  bwrap_unavailable_reason,
  probe_bwrap,
)
from retool_jax.sandbox.limits import STATUSES, ExecResult, Limits
from retool_jax.sandbox.policy import DEFAULT_ALLOWED, DEFAULT_POLICY, ModulePolicy
from retool_jax.sandbox.pool import Sandbox, Session, default_sandbox, run_python
from retool_jax.sandbox.remote import RemoteSandbox, create_sandbox

__all__ = [
  "DEFAULT_ALLOWED",
  "DEFAULT_POLICY",
  "STATUSES",
  "BwrapBackend",
  "BwrapProbe",
  "ExecResult",
  "Limits",
  "ModulePolicy",
  "ProcessBackend",
  "RemoteSandbox",
  "Sandbox",
  "Session",
  "bwrap_unavailable_reason",
  "create_sandbox",
  "default_sandbox",
  "probe_bwrap",
  "run_python",
]
