"""How a warm worker is launched: inside bubblewrap namespaces, or as a limited process."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER_SCRIPT = Path(__file__).resolve().with_name("worker.py")
TOKEN_VAR = "RETOOL_SANDBOX_TOKEN"
_HIDDEN_DIRS = ("/root", "/home")


def worker_env(token: str) -> dict[str, str]:
  """The scrubbed environment of a worker and its calls."""
  return {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONIOENCODING": "utf-8",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
    TOKEN_VAR: token,
  }


class ProcessBackend:
  """Workers are plain processes; each call is a forked child with rlimits, a new session,
  a scratch cwd and a scrubbed environment, and everything it spawned is killed afterwards.

  No namespaces: the call shares the host's filesystem view, network and user id.
  """

  name = "process"
  # Directories the worker empties after each call (none: they would be the host's).
  private_dirs: tuple[str, ...] = ()

  def make_scratch(self) -> str:
    return tempfile.mkdtemp(prefix="retool-sandbox-")

  def command(self, config_json: str, scratch_mb: int, env: dict[str, str]) -> list[str]:
    del scratch_mb, env  # the environment is passed to the process directly
    return [sys.executable, "-I", "-B", str(WORKER_SCRIPT), config_json]

  def scratch_in_worker(self, host_scratch: str) -> str:
    return host_scratch


class BwrapBackend:
  """Workers run inside bubblewrap: new user/pid/net/ipc/uts namespaces, a read-only view of
  the root with home directories hidden (the Python installation is bound back read-only),
  a size-limited private tmpfs for scratch, no capabilities, and death with the parent.
  """

  name = "bwrap"
  # The sandbox's own tmpfs mounts: what a call leaves there is removed after it.
  private_dirs: tuple[str, ...] = ("/tmp", "/var/tmp", "/dev/shm")

  def __init__(self, executable: str | None = None):
    self.executable = executable or shutil.which("bwrap") or "bwrap"

  def make_scratch(self) -> str | None:
    return None

  def scratch_in_worker(self, host_scratch: str | None) -> str:
    del host_scratch
    return "/tmp/sandbox"

  def command(self, config_json: str, scratch_mb: int, env: dict[str, str]) -> list[str]:
    setenv = [a for k, v in env.items() for a in ("--setenv", k, v)]
    return self._prefix(scratch_mb) + setenv + [sys.executable, "-I", "-B", str(WORKER_SCRIPT), config_json]

  def _prefix(self, scratch_mb: int) -> list[str]:
    size = str(scratch_mb * 1024 * 1024)
    args = [
      self.executable,
      "--unshare-all",
      "--die-with-parent",
      "--new-session",
      "--as-pid-1",
      "--cap-drop",
      "ALL",
      "--ro-bind",
      "/",
      "/",
      "--proc",
      "/proc",
      "--dev",
      "/dev",
      "--size",
      size,
      "--tmpfs",
      "/tmp",
      "--size",
      size,
      "--tmpfs",
      "/dev/shm",
      "--size",
      size,
      "--tmpfs",
      "/var/tmp",
    ]
    for hidden in _HIDDEN_DIRS:
      if os.path.isdir(hidden):
        args += ["--tmpfs", hidden]
    for path in _python_paths():
      if any(path == h or path.startswith(h + "/") for h in _HIDDEN_DIRS):
        args += ["--ro-bind", path, path]
    args += ["--chdir", "/tmp", "--clearenv"]
    return args

  def probe(self) -> str | None:
    """None when bubblewrap can start a sandbox here, else the reason it cannot."""
    return _probe_bwrap(self.executable)


def _python_paths() -> list[str]:
  """Directories the interpreter needs, most general first, without nested duplicates."""
  candidates = {
    sys.prefix,
    sys.base_prefix,
    sys.exec_prefix,
    sys.base_exec_prefix,
    os.path.dirname(os.path.realpath(sys.executable)),
    str(WORKER_SCRIPT.parent),
  }
  candidates.update(p for p in sys.path if p)
  real = sorted(
    {os.path.realpath(p) for p in candidates if os.path.exists(p)} | {p for p in candidates if os.path.exists(p)}
  )
  kept: list[str] = []
  for p in real:
    if not any(p == k or p.startswith(k + "/") for k in kept):
      kept.append(p)
  return kept


@functools.lru_cache(maxsize=4)
def _probe_bwrap(executable: str) -> str | None:
  if not shutil.which(executable):
    return f"{executable!r} is not installed (apt-get install bubblewrap)"
  cmd = BwrapBackend(executable)._prefix(16) + [sys.executable, "-I", "-c", "print('ok')"]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"bubblewrap failed to start: {e}"
  if proc.returncode != 0 or proc.stdout.strip() != "ok":
    return f"bubblewrap cannot create namespaces here: {proc.stderr.strip() or proc.returncode}"
  return None


def bwrap_unavailable_reason() -> str | None:
  """None when the bwrap backend works on this machine, else why it does not."""
  return BwrapBackend().probe()


def resolve_backend(name: str):
  """``auto`` picks bwrap where it works, else the process backend."""
  if name == "auto":
    return BwrapBackend() if bwrap_unavailable_reason() is None else ProcessBackend()
  if name == "bwrap":
    reason = bwrap_unavailable_reason()
    if reason is not None:
      raise RuntimeError(f"sandbox backend 'bwrap' is unavailable: {reason}")
    return BwrapBackend()
  if name == "process":
    return ProcessBackend()
  raise ValueError(f"unknown sandbox backend {name!r}; expected 'auto', 'bwrap', 'process' or 'remote'")
