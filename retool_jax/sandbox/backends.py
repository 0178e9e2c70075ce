"""How a warm worker is launched: inside bubblewrap namespaces, or as a limited process."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from retool_jax.sandbox.worker import WorkerConfig

WORKER_SCRIPT = Path(__file__).resolve().with_name("worker.py")
TOKEN_VAR = "RETOOL_SANDBOX_TOKEN"
BACKEND_VAR = "RETOOL_SANDBOX_BACKEND"
# Directories the bwrap sandbox replaces with its own size-limited tmpfs: scratch space, and host files hidden.
_PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
_HIDDEN_DIRS = ("/root", "/home")
_PROBE_TIMEOUT_S = 60.0

log = logging.getLogger("retool_jax.sandbox")


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


def worker_config(scratch: str, preload: tuple[str, ...], env: dict[str, str], backend) -> WorkerConfig:
  """The configuration a worker starts with."""
  return WorkerConfig(scratch, env, tuple(preload), tuple(backend.private_dirs), tuple(backend.bound_private))


class ProcessBackend:
  """Workers are plain processes; each call is a forked child with rlimits, a new session,
  a scratch cwd and a scrubbed environment, and everything it spawned is killed afterwards.

  No namespaces: the call shares the host's filesystem view, network and user id.
  """

  name = "process"
  # Directories the worker empties after each call (none: they would be the host's).
  private_dirs: tuple[str, ...] = ()
  bound_private: tuple[str, ...] = ()

  def make_scratch(self) -> str:
    return tempfile.mkdtemp(prefix="retool-sandbox-")

  def command(self, config_json: str, scratch_mb: int, env: dict[str, str]) -> list[str]:
    del scratch_mb, env  # the environment is passed to the process directly
    return [sys.executable, "-I", "-B", str(WORKER_SCRIPT), config_json]

  def scratch_in_worker(self, host_scratch: str) -> str:
    return host_scratch


class BwrapBackend:
  """Workers run inside bubblewrap: new user/pid/net/ipc/uts namespaces, a read-only view of
  the root with home directories hidden, size-limited private tmpfs mounts on ``/tmp``, ``/var/tmp``
  and ``/dev/shm``, no capabilities, and death with the parent.

  What the interpreter needs and those mounts would hide (a virtual environment or checkout under
  ``/tmp``, a Python under ``/root``) is bound back read-only at the same path, symlinks resolved.
  """

  name = "bwrap"

  def __init__(self, executable: str | None = None):
    self.executable = executable or shutil.which("bwrap") or "bwrap"
    self.hidden_dirs = tuple(d for d in _HIDDEN_DIRS if os.path.isdir(d))
    # The sandbox's own tmpfs mounts: what a call leaves there is removed after it.
    self.private_dirs: tuple[str, ...] = _PRIVATE_TMP_DIRS + self.hidden_dirs
    # Host paths bound back read-only inside those mounts (kept by the clean-up).
    self.bound_private = interpreter_binds(self.private_dirs)

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
    args = [self.executable, "--unshare-all", "--die-with-parent", "--new-session", "--as-pid-1"]
    args += ["--cap-drop", "ALL", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    for directory in self.private_dirs:
      args += ["--size", size, "--tmpfs", directory]
    for path in self.bound_private:
      args += ["--ro-bind", path, path]
    args += ["--chdir", "/tmp", "--clearenv"]
    return args

  def probe(self) -> BwrapProbe:
    """Whether bubblewrap can start a worker here, and if not, why."""
    return _probe_bwrap(self.executable)


@dataclasses.dataclass(frozen=True)
class BwrapProbe:
  """The outcome of trying bubblewrap on this machine.

  ``kind`` is ``ok``; ``missing`` (bubblewrap is not installed); ``namespaces`` (bubblewrap is installed
  but the kernel or the container refuses the namespaces it needs); or ``interpreter`` (namespaces work
  but this Python cannot start a worker inside them).
  """

  kind: str
  reason: str | None = None

  @property
  def ok(self) -> bool:
    return self.kind == "ok"


@functools.lru_cache(maxsize=1)
def _isolated_sys_path() -> tuple[str, ...]:
  """``sys.path`` of this interpreter started with ``-I``, as the worker starts it."""
  cmd = [sys.executable, "-I", "-c", "import json, sys; print(json.dumps(sys.path))"]
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=True).stdout
    return tuple(json.loads(out))
  except (OSError, subprocess.SubprocessError, ValueError):
    return tuple(sys.path)


def _under(path: str, roots: tuple[str, ...]) -> bool:
  return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def interpreter_binds(masked: tuple[str, ...]) -> tuple[str, ...]:
  """The paths the worker's interpreter needs below the ``masked`` directories: its prefixes, the
  directory of the real executable, the worker's own package and its isolated ``sys.path``, each with
  symlinks resolved as well, most general first, without nested duplicates. A masked directory itself
  is never bound (that would expose all of it)."""
  candidates = {
    sys.prefix,
    sys.base_prefix,
    sys.exec_prefix,
    sys.base_exec_prefix,
    os.path.dirname(os.path.abspath(sys.executable)),
    os.path.dirname(os.path.realpath(sys.executable)),
    str(WORKER_SCRIPT.parent),
  }
  candidates.update(p for p in _isolated_sys_path() if p and os.path.isabs(p))
  paths = {os.path.normpath(p) for p in candidates} | {os.path.realpath(p) for p in candidates}
  needed = sorted(p for p in paths if os.path.exists(p) and _under(p, masked) and p not in masked)
  kept: list[str] = []
  for p in needed:
    if not _under(p, tuple(kept)):
      kept.append(p)
  return tuple(kept)


def _first_line(text: str) -> str:
  lines = [ln for ln in text.strip().splitlines() if ln.strip()]
  return lines[-1].strip() if lines else ""


@functools.lru_cache(maxsize=4)
def _probe_bwrap(executable: str) -> BwrapProbe:
  found = shutil.which(executable)
  if not found:
    return BwrapProbe(
      "missing", f"bubblewrap is not installed ({executable!r} is not on PATH; apt-get install bubblewrap)"
    )
  true = shutil.which("true") or "/bin/true"
  bare = [
    found,
    "--unshare-all",
    "--die-with-parent",
    "--ro-bind",
    "/",
    "/",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    true,
  ]
  try:
    proc = subprocess.run(bare, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    return BwrapProbe("namespaces", f"bubblewrap ({found}) could not be run: {e}")
  if proc.returncode != 0:
    detail = _first_line(proc.stderr) or f"exit status {proc.returncode}"
    return BwrapProbe("namespaces", f"the kernel refuses the namespaces bubblewrap needs: {detail}")
  backend = BwrapBackend(found)
  env = worker_env("probe")
  config = json.dumps(worker_config(backend.scratch_in_worker(None), (), env, backend).to_wire())
  try:
    proc = subprocess.run(
      backend.command(config, 16, env),
      stdin=subprocess.DEVNULL,
      capture_output=True,
      text=True,
      timeout=_PROBE_TIMEOUT_S,
      check=False,
      env=env,
    )
    ready = json.loads(proc.stdout.splitlines()[0]).get("ready") if proc.stdout.strip() else False
  except (OSError, subprocess.TimeoutExpired, ValueError) as e:
    ready, proc = False, None
    detail = str(e)
  else:
    detail = _first_line(proc.stderr) or f"exit status {proc.returncode}"
  if not ready:
    return BwrapProbe(
      "interpreter", f"bubblewrap runs, but {sys.executable} cannot start a sandbox worker inside it: {detail}"
    )
  return BwrapProbe("ok")


def probe_bwrap() -> BwrapProbe:
  """Whether the bwrap backend works on this machine (cached per process)."""
  return BwrapBackend().probe()


def bwrap_unavailable_reason() -> str | None:
  """None when the bwrap backend works on this machine, else why it does not."""
  return probe_bwrap().reason


_ISOLATED = "no network, read-only root, private /tmp, home directories hidden"
_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
  if message not in _logged:
    _logged.add(message)
    log.log(level, message)


def select_backend(name: str):
  """(backend, why it runs). ``auto`` picks bwrap where it works, else the process backend, and logs
  which and why once per process (a warning when it is the process backend); ``bwrap`` raises when
  bubblewrap cannot run here instead of falling back."""
  if name == "auto":
    probe = probe_bwrap()
    if probe.ok:
      why = f"auto: {_ISOLATED}"
      _log_once(logging.INFO, f"sandbox backend: bwrap ({why})")
      return BwrapBackend(), why
    why = (
      f"auto: NOT isolated (no network namespace, host files readable), because {probe.reason}; "
      f"set {BACKEND_VAR}=bwrap to fail instead, or =process to choose it"
    )
    _log_once(logging.WARNING, f"sandbox backend: process ({why})")
    return ProcessBackend(), why
  if name == "bwrap":
    probe = probe_bwrap()
    if not probe.ok:
      raise RuntimeError(f"sandbox backend 'bwrap' was requested but cannot run here: {probe.reason}")
    why = f"requested: {_ISOLATED}"
    _log_once(logging.INFO, f"sandbox backend: bwrap ({why})")
    return BwrapBackend(), why
  if name == "process":
    why = "requested: rlimits and process cleanup only, no namespaces"
    _log_once(logging.INFO, f"sandbox backend: process ({why})")
    return ProcessBackend(), why
  raise ValueError(f"unknown sandbox backend {name!r}; expected 'auto', 'bwrap', 'process' or 'remote'")


def resolve_backend(name: str):
  """The backend ``name`` selects (see :func:`select_backend`)."""
  return select_backend(name)[0]
