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


def _apply_limits(lim: dict, cpu_s: float, nproc: int) -> None:
  mib = 1024 * 1024
  cpu = max(1, int(-(-cpu_s // 1)))
  resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
  resource.setrlimit(resource.RLIMIT_FSIZE, (lim["max_file_mb"] * mib,) * 2)
  resource.setrlimit(resource.RLIMIT_NOFILE, (lim["max_open_files"],) * 2)
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
  if lim.get("memory_mb"):
    # The limit is headroom on top of the warm interpreter, whose address space is shared.
    base = _vm_size_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (base + lim["memory_mb"] * mib,) * 2)


def _vm_size_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmSize:"):
        return int(line.split()[1]) * 1024
  return 0


_NPROC_CACHE = [0.0, 0]


def _nproc_budget(max_procs: int) -> int:
  """RLIMIT_NPROC counts all processes of the user, so the budget sits on top of them."""
  now = time.monotonic()
  if now - _NPROC_CACHE[0] > 1.0:
    uid, count = os.getuid(), 0
    for name in os.listdir("/proc"):
      if name.isdigit():
        try:
          if os.stat(f"/proc/{name}").st_uid == uid:
            count += 1
        except OSError:
          pass
    _NPROC_CACHE[:] = [now, count]
  return _NPROC_CACHE[1] + max_procs


def _child_setup(fds: dict[str, int], scratch: str, env: dict[str, str], worker_pid: int) -> None:
  os.setsid()
  _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != worker_pid:
    os._exit(_EXIT_SETUP_FAILED)
  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
    signal.signal(sig, signal.SIG_DFL)
  # Move the pipe ends out of the way, then place them at fixed numbers and close the rest.
  high = {k: fcntl.fcntl(v, fcntl.F_DUPFD, 100) for k, v in fds.items()}
  devnull = os.open(os.devnull, os.O_RDONLY)
  os.dup2(devnull, 0)
  os.dup2(high["out"], 1)
  os.dup2(high["out"], 2)
  os.dup2(high["status"], 4)
  if "cells" in high:
    os.dup2(high["cells"], 3)
  os.closerange(5, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
  os.chdir(scratch)
  os.umask(0o077)
  os.environ.clear()
  os.environ.update(env)


def _child_python(code: str | None, lim: dict, allowed: list[str] | None, session: bool) -> None:
  """Runs one cell (or, for a session, cells read from fd 3) and reports on fd 4."""
  import runner  # noqa: PLC0415  (sibling file, on sys.path of the worker)

  interp = runner.Interpreter(allowed)
  if not session:
    rec = interp.run_cell(code, "<cell>")
    os.write(4, (json.dumps(rec) + "\n").encode())
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
    req = json.loads(line)
    rec = interp.run_cell(req["code"], f"<cell-{number}>" if number > 1 else "<cell>")
    os.write(4, (json.dumps(rec) + "\n").encode())


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


class Worker:
  def __init__(self, config: dict):
    self.base = config["scratch"]
    self.env = dict(config.get("env") or {})
    self.pid = os.getpid()
    self.calls = 0
    self.session: dict | None = None
    # Entries of the private tmpfs mounts that belong to the worker (its scratch base among them).
    self.private = {d: set(_listdir(d)) for d in config.get("private_dirs", ()) if os.path.isdir(d)}
    # Host paths bound read-only inside those mounts; the directories leading to them are the call's to clean.
    self.bound = frozenset(config.get("bound", ()))
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
    own = {"call"} | ({os.path.basename(self.session["scratch"])} if self.session else set())
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

  def _spawn(self, scratch: str, lim: dict, cpu_s: float, target) -> dict:
    out_r, out_w = os.pipe()
    st_r, st_w = os.pipe()
    fds = {"out": out_w, "status": st_w}
    cells_w = None
    if self.session is None and target[0] == "session":
      cells_r, cells_w = os.pipe()
      fds["cells"] = cells_r
    env = dict(self.env, HOME=scratch, TMPDIR=scratch, PWD=scratch)
    nproc = _nproc_budget(lim["max_procs"])
    pid = os.fork()
    if pid == 0:  # child
      try:
        _child_setup(fds, scratch, env, self.pid)
        _apply_limits(lim, cpu_s, nproc)
        kind = target[0]
        if kind == "exec":
          try:
            os.execve(target[1][0], target[1], env)
          finally:
            os._exit(_EXIT_EXEC_FAILED)
        _child_python(target[1], lim, target[2], session=kind == "session")
      except BaseException:  # noqa: BLE001
        pass
      finally:
        os._exit(0)
    for fd in fds.values():
      os.close(fd)
    os.set_blocking(out_r, False)
    os.set_blocking(st_r, False)
    return {
      "pid": pid,
      "out": out_r,
      "status": st_r,
      "cells": cells_w,
      "pidfd": os.pidfd_open(pid),
      "scratch": scratch,
    }

  @staticmethod
  def _close_child_fds(child: dict) -> None:
    for key in ("out", "status", "cells", "pidfd"):
      if child.get(key) is not None:
        try:
          os.close(child[key])
        except OSError:
          pass
        child[key] = None

  # -- collecting --------------------------------------------------------------------------

  def _collect(self, child: dict, lim: dict, deadline: float) -> tuple[dict | None, Output, bool, str | None]:
    """Reads output until a status record, the child's exit, the deadline (``"timeout"``) or,
    where the kernel does not limit processes, too many processes (``"procs"``)."""
    out = Output(lim["max_output_bytes"], lim.get("head_fraction", 0.5))
    watch = [child["out"], child["status"], child["pidfd"]]
    buf, record, exited, stopped = b"", None, False, None
    next_count = time.monotonic() + _PROC_CHECK_S if not self.nproc_enforced else float("inf")
    while True:
      now = time.monotonic()
      remaining = deadline - now
      if remaining <= 0:
        stopped = "timeout"
        break
      if now >= next_count:
        if self._live_processes() > lim["max_procs"]:
          stopped = "procs"
          break
        next_count = now + _PROC_CHECK_S
      ready, _, _ = select.select(watch, [], [], min(remaining, max(0.0, next_count - now)))
      if child["out"] in ready:
        self._drain(child["out"], out, watch)
      if child["status"] in ready:
        try:
          chunk = os.read(child["status"], 65536)
        except BlockingIOError:
          chunk = None
        if chunk:
          buf += chunk
          if b"\n" in buf:
            try:
              record = json.loads(buf.split(b"\n", 1)[0])
            except ValueError:
              record = None
            break
        elif chunk == b"":
          watch.remove(child["status"])
      if child["pidfd"] in ready:
        exited = True
        break
    self._drain(child["out"], out, watch)
    return record, out, exited, stopped

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
    record, out: Output, stopped: str | None, wstatus: int, cpu: float, lim: dict, cpu_s: float, kind: str
  ) -> tuple[str, str]:
    """Returns (status, note appended to the output)."""
    if stopped == "timeout":
      return "timeout", f"TimeoutError: the call exceeded its wall-time limit of {lim['timeout_s']:g} s"
    if stopped == "procs":
      return "killed", f"Killed: the call exceeded its limit of {lim['max_procs']} processes"
    if record is not None:
      return record.get("status", "error"), ""
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
  def _reply(status: str, out: Output, note: str, start: float, prefix: str = "", **extra) -> dict:
    text = prefix + out.text()
    if note:
      text = (text if not text or text.endswith("\n") else text + "\n") + note + "\n"
    return {
      "status": status,
      "output": text,
      "elapsed_s": time.monotonic() - start,
      "truncated_bytes": out.truncated,
      **extra,
    }

  # -- operations ----------------------------------------------------------------------

  def run_once(self, req: dict) -> dict:
    start = time.monotonic()
    lim = req["limits"]
    cpu_s = lim.get("cpu_s") or lim["timeout_s"]
    target = ("exec", req["argv"]) if "argv" in req else ("once", req["code"], req.get("allowed"))
    scratch = self._new_scratch("call")
    try:
      child = self._spawn(scratch, lim, cpu_s, target)
      try:
        record, out, _, stopped = self._collect(child, lim, start + lim["timeout_s"])
        wstatus, cpu = self._kill_and_wait(child["pid"])
      finally:
        self._close_child_fds(child)
      strays = kill_strays()
      status, note = self._classify(record, out, stopped, wstatus, cpu, lim, cpu_s, target[0])
      return self._reply(status, out, note, start, cpu_s=cpu, strays_killed=strays)
    finally:
      self._remove(scratch, keep_dir=True)
      self._wipe_private()

  def session_cell(self, req: dict) -> dict:
    start = time.monotonic()
    lim = req["limits"]
    prefix = ""
    if self.session is None:
      self.calls += 1
      scratch = self._new_scratch(f"session-{self.calls}")
      budget = lim.get("session_cpu_s") or 300.0
      self.session = self._spawn(scratch, lim, budget, ("session", None, req.get("allowed")))
      self.session["budget"] = budget
      if req.get("restarted"):
        prefix = "[the interpreter was restarted; variables from earlier calls are gone]\n"
    child = self.session
    try:
      os.set_blocking(child["cells"], True)
      os.write(child["cells"], (json.dumps({"code": req["code"]}) + "\n").encode())
    except OSError:
      pass
    record, out, exited, stopped = self._collect(child, lim, start + lim["timeout_s"])
    if record is not None and stopped is None and not exited:
      strays = kill_strays(keep=child["pid"])
      return self._reply(
        record.get("status", "error"), out, "", start, prefix, strays_killed=strays, session_alive=True
      )
    wstatus, cpu = self._kill_and_wait(child["pid"])
    self._close_child_fds(child)
    strays = kill_strays()
    status, note = self._classify(record, out, stopped, wstatus, cpu, lim, child["budget"], "once")
    self.session = None
    self._remove(child["scratch"])
    return self._reply(status, out, note, start, prefix, strays_killed=strays, session_alive=False)

  def session_close(self) -> dict:
    if self.session is not None:
      child = self.session
      self._kill_and_wait(child["pid"])
      self._close_child_fds(child)
      kill_strays()
      self._remove(child["scratch"])
      self.session = None
    return {"status": "ok", "output": "", "elapsed_s": 0.0}

  def handle(self, req: dict) -> dict:
    op = req.get("op")
    if op == "run":
      return self.run_once(req)
    if op == "cell":
      return self.session_cell(req)
    if op == "close":
      return self.session_close()
    if op == "ping":
      return {"status": "ok", "output": "pong", "elapsed_s": 0.0}
    return {"status": "error", "output": f"unknown op {op!r}", "elapsed_s": 0.0}


def main() -> None:
  config = json.loads(sys.argv[1])
  _prctl(PR_SET_CHILD_SUBREAPER, 1)
  _prctl(PR_SET_DUMPABLE, 0)  # calls cannot ptrace or read the worker's memory
  # The protocol gets private descriptors; fd 0/1 become /dev/null and stderr.
  proto_in, proto_out = os.dup(0), os.dup(1)
  devnull = os.open(os.devnull, os.O_RDONLY)
  os.dup2(devnull, 0)
  os.dup2(2, 1)
  os.makedirs(config["scratch"], mode=0o700, exist_ok=True)
  os.chdir(config["scratch"])
  for name in config.get("preload", ()):
    try:
      __import__(name)
    except Exception:  # noqa: BLE001  (a missing optional module only costs warmth)
      pass
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
      reply = worker.handle(json.loads(line))
    except Exception as e:  # noqa: BLE001
      reply = {"status": "error", "output": f"sandbox worker error: {type(e).__name__}: {e}", "elapsed_s": 0.0}
    os.write(proto_out, (json.dumps(reply) + "\n").encode())
  worker.session_close()
  kill_strays()


if __name__ == "__main__":
  main()
