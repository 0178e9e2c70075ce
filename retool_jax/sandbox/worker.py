"""The warm sandbox worker: a zygote that forks one limited child per call.

This file runs as a script inside the sandbox (``python -I worker.py CONFIG``) and imports
only the standard library, so it works on a read-only root with no project on the path.
It speaks newline-delimited JSON on its stdin/stdout: one request, one reply.

Per call it forks a child that starts a new session, applies the resource limits, drops
into a private scratch directory and runs the code with its output sent to a pipe. The
worker enforces the wall-time limit, keeps the head and tail of the output, and afterwards
kills every process the call left behind (the worker is a child subreaper, or pid 1 of a pid
namespace, so orphans of the call become its children) and deletes the scratch directory.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import gc
import json
import os
import resource
import select
import shutil
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36

# How often the process count of a call is checked where the kernel does not enforce RLIMIT_NPROC.
_PROC_CHECK_S = 0.05

# Exit codes of a child that could not report a status record.
_EXIT_SETUP_FAILED = 121
_EXIT_EXEC_FAILED = 127

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> None:
  _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


# ----------------------------------------------------------------------------------------
# The protocol: JSON objects on the wire, these dataclasses inside.


def _known_fields(cls, wire: dict) -> dict:
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in wire.items() if k in names}


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
  """What a worker starts with (JSON in its command line).

  Attributes:
    scratch: the directory the worker makes its calls' scratch directories in.
    env: the environment of every call (``HOME``, ``TMPDIR`` and ``PWD`` are set per call).
    preload: modules imported before the first call, so forked calls start warm.
    private_dirs: the sandbox's own tmpfs mounts; what a call leaves there is removed after it.
    bound: host paths bound read-only inside those mounts, which the clean-up keeps.
  """

  scratch: str
  env: dict[str, str] = dataclasses.field(default_factory=dict)
  preload: tuple[str, ...] = ()
  private_dirs: tuple[str, ...] = ()
  bound: tuple[str, ...] = ()

  @classmethod
  def from_wire(cls, wire: dict) -> WorkerConfig:
    return cls(
      scratch=wire["scratch"],
      env=dict(wire.get("env") or {}),
      preload=tuple(wire.get("preload", ())),
      private_dirs=tuple(wire.get("private_dirs", ())),
      bound=tuple(wire.get("bound", ())),
    )

  def to_wire(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CallLimits:
  """The limits the worker applies to one call: the fields of ``limits.Limits`` it reads (others on the wire
  are ignored; see there for their meaning)."""

  timeout_s: float
  max_output_bytes: int
  max_procs: int
  max_file_mb: int
  max_open_files: int
  cpu_s: float | None = None
  memory_mb: int | None = None
  head_fraction: float = 0.5
  session_cpu_s: float | None = None

  @classmethod
  def from_wire(cls, wire: dict) -> CallLimits:
    return cls(**_known_fields(cls, wire))

  def to_wire(self) -> dict:
    return dataclasses.asdict(self)

  @property
  def call_cpu_s(self) -> float:
    """The CPU-time limit of one call (the wall-time limit unless set)."""
    return self.cpu_s or self.timeout_s

  @property
  def session_budget_s(self) -> float:
    """The CPU-time budget of a whole session's interpreter."""
    return self.session_cpu_s or 300.0


@dataclasses.dataclass(frozen=True)
class Request:
  """One request: ``op`` is ``run`` (``code``, or a command's ``argv``, in a fresh child), ``cell`` (``code``
  in the session's interpreter; ``restarted`` says the previous one died, and the reply says so), ``close``
  (ends the session) or ``ping``. ``allowed`` is the module allow-list (None: no check)."""

  op: str
  limits: CallLimits | None = None
  code: str | None = None
  argv: list[str] | None = None
  allowed: list[str] | None = None
  restarted: bool = False

  @classmethod
  def from_wire(cls, wire: dict) -> Request:
    fields = _known_fields(cls, wire)
    if fields.get("limits") is not None:
      fields["limits"] = CallLimits.from_wire(fields["limits"])
    return cls(**fields)

  def to_wire(self) -> dict:
    wire = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
    if not self.restarted:
      del wire["restarted"]
    return wire

  def call_limits(self) -> CallLimits:
    if self.limits is None:
      raise ValueError(f"a {self.op!r} request needs limits")
    return self.limits


@dataclasses.dataclass(frozen=True)
class Reply:
  """The answer to one request. ``truncated_bytes`` (calls), ``cpu_s`` (one-shot calls), ``strays_killed``
  (calls) and ``session_alive`` (cells) are sent only where they apply."""

  status: str
  output: str = ""
  elapsed_s: float = 0.0
  truncated_bytes: int | None = None
  cpu_s: float | None = None
  strays_killed: int | None = None
  session_alive: bool | None = None

  @classmethod
  def from_wire(cls, wire: dict) -> Reply:
    """A reply as sent; one without a status is a call the sandbox could not finish (``killed``)."""
    return cls(**{"status": "killed", **_known_fields(cls, wire)})

  def to_wire(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class Output:
  """Keeps the first and last bytes of a stream, counting what was dropped in between."""

  def __init__(self, max_bytes: int, head_fraction: float = 0.5):
    self.max_bytes = max(0, int(max_bytes))
    self.head_cap = int(self.max_bytes * head_fraction)
    self.tail_cap = self.max_bytes - self.head_cap
    self.head = bytearray()
    self.tail = bytearray()
    self.total = 0

  def feed(self, data: bytes) -> None:
    self.total += len(data)
    room = self.head_cap - len(self.head)
    if room > 0:
      self.head += data[:room]
      data = data[room:]
    if data and self.tail_cap:
      self.tail += data
      if len(self.tail) > 2 * self.tail_cap:
        del self.tail[: len(self.tail) - self.tail_cap]

  def text(self) -> str:
    tail = bytes(self.tail[-self.tail_cap :]) if self.tail_cap else b""
    dropped = self.total - len(self.head) - len(tail)
    head = bytes(self.head).decode("utf-8", "replace")
    if dropped <= 0:
      return head + tail.decode("utf-8", "replace")
    return head + f"\n... [{dropped} bytes of output omitted] ...\n" + tail.decode("utf-8", "replace")

  @property
  def truncated(self) -> int:
    return max(0, self.total - self.max_bytes)


# ----------------------------------------------------------------------------------------
# Process bookkeeping.


def process_table() -> dict[int, tuple[int, str]]:
  """pid -> (ppid, state) for every process visible in /proc."""
  table = {}
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat", "rb") as f:
        stat = f.read()
    except OSError:
      continue
    rest = stat[stat.rfind(b")") + 2 :].split()
    table[int(name)] = (int(rest[1]), rest[0].decode())
  return table


def descendants(root: int, table: dict[int, tuple[int, str]]) -> list[int]:
  children: dict[int, list[int]] = {}
  for pid, (ppid, _) in table.items():
    children.setdefault(ppid, []).append(pid)
  out, stack = [], [root]
  while stack:
    for child in children.get(stack.pop(), ()):
      out.append(child)
      stack.append(child)
  return out


def count_descendants(root: int) -> int | None:
  """Live descendants of ``root``, walking /proc/PID/task/TID/children (cost grows with the tree, not
  with the host's process count); None where the kernel does not provide those files."""
  count, seen, stack = 0, {root}, [root]
  while stack:
    pid = stack.pop()
    try:
      tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
      continue
    for tid in tids:
      try:
        with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
          kids = [int(k) for k in f.read().split()]
      except FileNotFoundError:
        if pid == root and tid == str(root):
          return None
        continue
      except OSError:
        continue
      for kid in kids:
        if kid in seen:
          continue
        seen.add(kid)
        try:
          with open(f"/proc/{kid}/stat", "rb") as f:
            stat = f.read()
        except OSError:
          continue
        if stat[stat.rfind(b")") + 2 :].split()[0] != b"Z":
          count += 1
          stack.append(kid)
  return count


def _reap() -> bool:
  """Reaps exited children; returns whether any child is still alive."""
  while True:
    try:
      pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
      return False
    if pid == 0:
      return True


def kill_strays(keep: int | None = None) -> int:
  """SIGKILLs every descendant of this process except ``keep``; returns how many."""
  if keep is None and not _reap():
    return 0
  me, killed = os.getpid(), 0
  for _ in range(200):
    table = process_table()
    victims = [p for p in descendants(me, table) if p != keep and table[p][1] != "Z"]
    if not victims:
      break
    for pid in victims:
      try:
        os.kill(pid, signal.SIGKILL)
        killed += 1
      except ProcessLookupError:
        pass
    _reap()
    time.sleep(0.001)
  _reap()
  return killed


# ----------------------------------------------------------------------------------------
# The child side.


@dataclasses.dataclass(frozen=True)
class _Target:
  """What a forked child runs: ``exec`` (the command ``argv``), ``once`` (one cell of ``code``) or ``session``
  (cells read from fd 3 until it closes); ``allowed`` is the module allow-list of Python code."""

  kind: str
  argv: list[str] | None = None
  code: str | None = None
  allowed: list[str] | None = None


@dataclasses.dataclass(frozen=True)
class _ChildEnds:
  """The child's ends of its pipes: output (fd 1 and 2), status records (fd 4), a session's cells (fd 3)."""

  out: int
  status: int
  cells: int | None = None

  def fds(self) -> list[int]:
    return [fd for fd in (self.out, self.status, self.cells) if fd is not None]


def _apply_limits(lim: CallLimits, cpu_s: float, nproc: int) -> None:
  mib = 1024 * 1024
  cpu = max(1, int(-(-cpu_s // 1)))
  resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
  resource.setrlimit(resource.RLIMIT_FSIZE, (lim.max_file_mb * mib,) * 2)
  resource.setrlimit(resource.RLIMIT_NOFILE, (lim.max_open_files,) * 2)
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
  if lim.memory_mb:
    # The limit is headroom on top of the warm interpreter, whose address space is shared.
    base = _vm_size_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (base + lim.memory_mb * mib,) * 2)


def _vm_size_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmSize:"):
        return int(line.split()[1]) * 1024
  return 0


@dataclasses.dataclass
class _UserProcesses:
  """The number of processes this user runs, counted at most once a second."""

  counted_at: float = float("-inf")
  count: int = 0

  def nproc_budget(self, max_procs: int) -> int:
    """RLIMIT_NPROC counts all processes of the user, so the budget sits on top of them."""
    now = time.monotonic()
    if now - self.counted_at > 1.0:
      uid, count = os.getuid(), 0
      for name in os.listdir("/proc"):
        if name.isdigit():
          try:
            if os.stat(f"/proc/{name}").st_uid == uid:
              count += 1
          except OSError:
            pass
      self.counted_at, self.count = now, count
    return self.count + max_procs


def _child_setup(ends: _ChildEnds, scratch: str, env: dict[str, str], worker_pid: int) -> None:
  os.setsid()
  _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != worker_pid:
    os._exit(_EXIT_SETUP_FAILED)
  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
    signal.signal(sig, signal.SIG_DFL)
  # Move the pipe ends out of the way, then place them at fixed numbers and close the rest.
  out, status = (fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (ends.out, ends.status))
  cells = None if ends.cells is None else fcntl.fcntl(ends.cells, fcntl.F_DUPFD, 100)
  devnull = os.open(os.devnull, os.O_RDONLY)
  os.dup2(devnull, 0)
  os.dup2(out, 1)
  os.dup2(out, 2)
  os.dup2(status, 4)
  if cells is not None:
    os.dup2(cells, 3)
  os.closerange(5, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
  os.chdir(scratch)
  os.umask(0o077)
  os.environ.clear()
  os.environ.update(env)


def _report(status: str) -> None:
  """Sends a cell's status record to the worker (fd 4)."""
  os.write(4, (json.dumps({"status": status}) + "\n").encode())


def _child_python(target: _Target) -> None:
  """Runs one cell (or, for a session, cells read from fd 3) and reports on fd 4."""
  import runner  # noqa: PLC0415  (a sibling file, importable once main() has put it on sys.path)

  interp = runner.Interpreter(target.allowed)
  if target.kind == "once":
    _report(interp.run_cell(target.code, "<cell>"))
    return
  cells = os.fdopen(3, "rb", buffering=0)
  number = 0
  buf = b""
  while True:
    while b"\n" not in buf:
      chunk = cells.read(65536)
      if not chunk:
        return
      buf += chunk
    line, buf = buf.split(b"\n", 1)
    number += 1
    code = json.loads(line)["code"]
    _report(interp.run_cell(code, f"<cell-{number}>" if number > 1 else "<cell>"))


# ----------------------------------------------------------------------------------------
# The worker.


def _host_uid() -> int:
  """This process's user id outside its user namespace (0 for root, which RLIMIT_NPROC does not bind)."""
  uid = os.getuid()
  try:
    with open("/proc/self/uid_map") as f:
      for line in f:
        inside, outside, count = map(int, line.split())
        if inside <= uid < inside + count:
          return outside + uid - inside
  except (OSError, ValueError):
    pass
  return uid


def _listdir(path: str) -> list[str]:
  try:
    return os.listdir(path)
  except OSError:
    return []


@dataclasses.dataclass
class Child:
  """A forked call: its process, the worker's ends of its pipes (None once closed) and its scratch directory.

  ``cpu_s`` is the CPU-time limit it runs under; for a session's interpreter, the budget of the whole session.
  """

  pid: int
  pidfd: int | None
  out: int | None
  status: int | None
  cells: int | None
  scratch: str
  cpu_s: float

  def close_fds(self) -> None:
    for fd in (self.out, self.status, self.cells, self.pidfd):
      if fd is not None:
        try:
          os.close(fd)
        except OSError:
          pass
    self.out = self.status = self.cells = self.pidfd = None


@dataclasses.dataclass
class Collected:
  """What a call produced by the time the worker stopped watching it.

  Attributes:
    status: the status the call reported itself (None when it sent no record).
    out: its output, head and tail.
    exited: whether its process exited.
    stopped: why the worker stopped it, ``"timeout"`` or ``"procs"`` (too many processes), or None.
  """

  status: str | None
  out: Output
  exited: bool
  stopped: str | None


def _record_status(line: bytes) -> str | None:
  """The status in a child's status record; None for a record that does not parse."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  return record.get("status", "error") if isinstance(record, dict) else None


class Worker:
  def __init__(self, config: WorkerConfig):
    self.base = config.scratch
    self.env = dict(config.env)
    self.pid = os.getpid()
    self.calls = 0
    self.session: Child | None = None
    self.user_processes = _UserProcesses()
    # Entries of the private tmpfs mounts that belong to the worker (its scratch base among them).
    self.private = {d: set(_listdir(d)) for d in config.private_dirs if os.path.isdir(d)}
    # Host paths bound read-only inside those mounts; the directories leading to them are the call's to clean.
    self.bound = frozenset(config.bound)
    self.nproc_enforced = _host_uid() != 0

  # -- scratch directories --------------------------------------------------------------

  def _new_scratch(self, name: str) -> str:
    path = os.path.join(self.base, name)
    os.makedirs(path, 0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path

  @staticmethod
  def _remove(path: str, keep_dir: bool = False) -> None:
    """Deletes ``path`` (or only its contents), whatever permissions the call left on it."""

    def onerror(func, p, _):
      try:
        os.chmod(os.path.dirname(p), 0o700)
        if not os.path.islink(p):
          os.chmod(p, 0o700)
        func(p)
      except OSError:
        pass

    try:
      os.chmod(path, 0o700)
      entries = os.listdir(path)
    except OSError:
      return
    for entry in entries:
      full = os.path.join(path, entry)
      if os.path.isdir(full) and not os.path.islink(full):
        shutil.rmtree(full, onerror=onerror)
      else:
        try:
          os.unlink(full)
        except OSError:
          onerror(os.unlink, full, None)
    if not keep_dir:
      shutil.rmtree(path, onerror=onerror)

  def _wipe_private(self) -> None:
    """Removes what a call left next to its scratch directory and in the worker's private tmpfs mounts."""
    own = {"call"} | ({os.path.basename(self.session.scratch)} if self.session else set())
    for directory, keep in [(self.base, own), *self.private.items()]:
      self._wipe(directory, keep)

  def _wipe(self, directory: str, keep: set[str] | frozenset[str]) -> None:
    for entry in _listdir(directory):
      full = os.path.join(directory, entry)
      if full in self.bound:
        continue
      if any(b.startswith(full + "/") for b in self.bound):
        self._wipe(full, frozenset())  # a directory leading to a bound path: only the path is kept
      elif entry not in keep:
        if os.path.isdir(full) and not os.path.islink(full):
          self._remove(full)
        else:
          try:
            os.unlink(full)
          except OSError:
            pass

  # -- spawning ------------------------------------------------------------------------

  def _spawn(self, scratch: str, lim: CallLimits, cpu_s: float, target: _Target) -> Child:
    out_r, out_w = os.pipe()
    st_r, st_w = os.pipe()
    cells_r = cells_w = None
    if target.kind == "session":
      cells_r, cells_w = os.pipe()
    ends = _ChildEnds(out_w, st_w, cells_r)
    env = dict(self.env, HOME=scratch, TMPDIR=scratch, PWD=scratch)
    nproc = self.user_processes.nproc_budget(lim.max_procs)
    pid = os.fork()
    if pid == 0:  # child
      try:
        _child_setup(ends, scratch, env, self.pid)
        _apply_limits(lim, cpu_s, nproc)
        if target.kind == "exec":
          try:
            os.execve(target.argv[0], target.argv, env)
          finally:
            os._exit(_EXIT_EXEC_FAILED)
        _child_python(target)
      except BaseException:  # noqa: BLE001
        pass
      finally:
        os._exit(0)
    for fd in ends.fds():
      os.close(fd)
    os.set_blocking(out_r, False)
    os.set_blocking(st_r, False)
    return Child(pid, os.pidfd_open(pid), out_r, st_r, cells_w, scratch, cpu_s)

  # -- collecting --------------------------------------------------------------------------

  def _collect(self, child: Child, lim: CallLimits, deadline: float) -> Collected:
    """Reads output until a status record, the child's exit, the deadline (``"timeout"``) or,
    where the kernel does not limit processes, too many processes (``"procs"``)."""
    out = Output(lim.max_output_bytes, lim.head_fraction)
    watch = [child.out, child.status, child.pidfd]
    buf, status, exited, stopped = b"", None, False, None
    next_count = time.monotonic() + _PROC_CHECK_S if not self.nproc_enforced else float("inf")
    while True:
      now = time.monotonic()
      remaining = deadline - now
      if remaining <= 0:
        stopped = "timeout"
        break
      if now >= next_count:
        if self._live_processes() > lim.max_procs:
          stopped = "procs"
          break
        next_count = now + _PROC_CHECK_S
      ready, _, _ = select.select(watch, [], [], min(remaining, max(0.0, next_count - now)))
      if child.out in ready:
        self._drain(child.out, out, watch)
      if child.status in ready:
        try:
          chunk = os.read(child.status, 65536)
        except BlockingIOError:
          chunk = None
        if chunk:
          buf += chunk
          if b"\n" in buf:
            status = _record_status(buf.split(b"\n", 1)[0])
            break
        elif chunk == b"":
          watch.remove(child.status)
      if child.pidfd in ready:
        exited = True
        break
    self._drain(child.out, out, watch)
    return Collected(status, out, exited, stopped)

  def _live_processes(self) -> int:
    count = count_descendants(self.pid)
    if count is None:
      table = process_table()
      count = sum(1 for p in descendants(self.pid, table) if table[p][1] != "Z")
    return count

  @staticmethod
  def _drain(fd: int, out: Output, watch: list) -> None:
    while True:
      try:
        chunk = os.read(fd, 65536)
      except BlockingIOError:
        return
      except OSError:
        chunk = b""
      if not chunk:
        if fd in watch:
          watch.remove(fd)
        return
      out.feed(chunk)

  @staticmethod
  def _kill_and_wait(pid: int) -> tuple[int, float]:
    """Kills the child's process group and returns (wait status, CPU seconds used)."""
    try:
      os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    _, status, usage = os.wait4(pid, 0)
    return status, usage.ru_utime + usage.ru_stime

  @staticmethod
  def _classify(
    got: Collected, wstatus: int, cpu: float, lim: CallLimits, cpu_s: float, kind: str
  ) -> tuple[str, str]:
    """Returns (status, note appended to the output)."""
    if got.stopped == "timeout":
      return "timeout", f"TimeoutError: the call exceeded its wall-time limit of {lim.timeout_s:g} s"
    if got.stopped == "procs":
      return "killed", f"Killed: the call exceeded its limit of {lim.max_procs} processes"
    if got.status is not None:
      return got.status, ""
    if os.WIFSIGNALED(wstatus):
      sig = os.WTERMSIG(wstatus)
      if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cpu_s):
        return "timeout", f"TimeoutError: the call exceeded its CPU-time limit of {cpu_s:g} s"
      try:
        name = signal.Signals(sig).name
      except ValueError:
        name = f"signal {sig}"
      detail = {
        "SIGSEGV": " (segmentation fault)",
        "SIGBUS": " (bus error)",
        "SIGABRT": " (aborted)",
        "SIGFPE": " (arithmetic fault)",
      }.get(name, "")
      return "killed", f"Killed: the process was terminated by {name}{detail}"
    code = os.WEXITSTATUS(wstatus)
    if kind == "exec":
      if code == 0:
        return "ok", ""
      if code == _EXIT_EXEC_FAILED:
        return "error", "Error: the command could not be started"
      return "error", f"[exit code {code}]"
    if code == _EXIT_SETUP_FAILED:
      return "killed", "Killed: the sandbox could not start the call"
    return "error", f"SystemExit: the process exited with code {code} before finishing the cell"

  @staticmethod
  def _reply(status: str, out: Output, note: str, start: float, prefix: str = "", **extra) -> Reply:
    text = prefix + out.text()
    if note:
      text = (text if not text or text.endswith("\n") else text + "\n") + note + "\n"
    return Reply(status, text, time.monotonic() - start, out.truncated, **extra)

  # -- operations ----------------------------------------------------------------------

  def run_once(self, req: Request) -> Reply:
    start = time.monotonic()
    lim = req.call_limits()
    if req.argv is not None:
      target = _Target("exec", argv=req.argv)
    else:
      target = _Target("once", code=req.code, allowed=req.allowed)
    scratch = self._new_scratch("call")
    try:
      child = self._spawn(scratch, lim, lim.call_cpu_s, target)
      try:
        got = self._collect(child, lim, start + lim.timeout_s)
        wstatus, cpu = self._kill_and_wait(child.pid)
      finally:
        child.close_fds()
      strays = kill_strays()
      status, note = self._classify(got, wstatus, cpu, lim, child.cpu_s, target.kind)
      return self._reply(status, got.out, note, start, cpu_s=cpu, strays_killed=strays)
    finally:
      self._remove(scratch, keep_dir=True)
      self._wipe_private()

  def session_cell(self, req: Request) -> Reply:
    start = time.monotonic()
    lim = req.call_limits()
    prefix = ""
    if self.session is None:
      self.calls += 1
      scratch = self._new_scratch(f"session-{self.calls}")
      target = _Target("session", allowed=req.allowed)
      self.session = self._spawn(scratch, lim, lim.session_budget_s, target)
      if req.restarted:
        prefix = "[the interpreter was restarted; variables from earlier calls are gone]\n"
    child = self.session
    try:
      os.set_blocking(child.cells, True)
      os.write(child.cells, (json.dumps({"code": req.code}) + "\n").encode())
    except OSError:
      pass
    got = self._collect(child, lim, start + lim.timeout_s)
    if got.status is not None and got.stopped is None and not got.exited:
      strays = kill_strays(keep=child.pid)
      return self._reply(got.status, got.out, "", start, prefix, strays_killed=strays, session_alive=True)
    wstatus, cpu = self._kill_and_wait(child.pid)
    child.close_fds()
    strays = kill_strays()
    status, note = self._classify(got, wstatus, cpu, lim, child.cpu_s, "once")
    self.session = None
    self._remove(child.scratch)
    return self._reply(status, got.out, note, start, prefix, strays_killed=strays, session_alive=False)

  def session_close(self) -> Reply:
    if self.session is not None:
      child = self.session
      self._kill_and_wait(child.pid)
      child.close_fds()
      kill_strays()
      self._remove(child.scratch)
      self.session = None
    return Reply("ok")

  def handle(self, req: Request) -> Reply:
    if req.op == "run":
      return self.run_once(req)
    if req.op == "cell":
      return self.session_cell(req)
    if req.op == "close":
      return self.session_close()
    if req.op == "ping":
      return Reply("ok", "pong")
    return Reply("error", f"unknown op {req.op!r}")


def main() -> None:
  config = WorkerConfig.from_wire(json.loads(sys.argv[1]))
  _prctl(PR_SET_CHILD_SUBREAPER, 1)
  _prctl(PR_SET_DUMPABLE, 0)  # calls cannot ptrace or read the worker's memory
  # The protocol gets private descriptors; fd 0/1 become /dev/null and stderr.
  proto_in, proto_out = os.dup(0), os.dup(1)
  devnull = os.open(os.devnull, os.O_RDONLY)
  os.dup2(devnull, 0)
  os.dup2(2, 1)
  os.makedirs(config.scratch, mode=0o700, exist_ok=True)
  os.chdir(config.scratch)
  for name in config.preload:
    try:
      __import__(name)
    except Exception:  # noqa: BLE001  (a missing optional module only costs warmth)
      pass
  # runner.py is imported from this file's directory, which the isolated interpreter (-I) does not search;
  # the path is removed again so that calls cannot import the sandbox's own files.
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path.insert(0, here)
  import runner  # noqa: F401, PLC0415

  sys.path[:] = [p for p in sys.path if p and p != here]
  gc.collect()
  gc.freeze()  # forked calls then do not copy the warm heap when the collector runs
  worker = Worker(config)
  reader = os.fdopen(proto_in, "rb")
  os.write(proto_out, (json.dumps({"ready": True, "pid": os.getpid()}) + "\n").encode())
  for line in reader:
    try:
      reply = worker.handle(Request.from_wire(json.loads(line)))
    except Exception as e:  # noqa: BLE001
      reply = Reply("error", f"sandbox worker error: {type(e).__name__}: {e}")
    os.write(proto_out, (json.dumps(reply.to_wire()) + "\n").encode())
  worker.session_close()
  kill_strays()


if __name__ == "__main__":
  main()
