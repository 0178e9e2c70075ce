"""Interpreter semantics inside a sandboxed child: REPL-style values and user-only tracebacks.

Standard library only: this file is imported by ``worker.py`` inside the sandbox.
"""

from __future__ import annotations

import ast
import builtins
import io
import linecache
import os
import sys
import traceback
import types


class SandboxPolicyError(ImportError):
  """Raised when the code imports a module outside the sandbox's allow-list."""


class _Stream(io.TextIOWrapper):
  """A write-through text stream that remembers whether anything was written."""

  wrote = False

  def write(self, s):
    if s:
      _Stream.wrote = True
    return super().write(s)


def _stream(fd: int) -> _Stream:
  return _Stream(
    io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True
  )


_SPAWN_EVENTS = frozenset(
  {
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "subprocess.Popen",
    "pty.spawn",
    "os.kill",
    "os.killpg",
    "signal.pthread_kill",
    "resource.setrlimit",
    "resource.prlimit",
    "ctypes.dlopen",
    "ctypes.dlsym",
    "ctypes.cdata",
    "ctypes.call_function",
    "socket.__new__",
    "socket.connect",
    "socket.bind",
    "socket.sendto",
    "socket.getaddrinfo",
    "sys.remote_exec",
    "os.setuid",
    "os.setgid",
    "os.setresuid",
    "os.chroot",
    "mmap.__new__",
    "shutil.chown",
  }
)
_PATH_EVENTS = frozenset(
  {
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.chmod",
    "os.chown",
    "os.symlink",
    "os.link",
    "os.truncate",
    "os.utime",
    "os.mkfifo",
    "os.mknod",
    "shutil.rmtree",
    "shutil.copyfile",
    "shutil.move",
  }
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _install_guard(scratch: str) -> None:
  """An audit hook (it cannot be removed) that confines Python-level file writes to the
  scratch directory, file reads to the interpreter's own files, and refuses sockets, new
  processes, signals, rlimit changes and ctypes. Native code can get around it: this is
  defence in depth on top of the operating-system limits."""
  readable = [
    scratch,
    sys.prefix,
    sys.base_prefix,
    sys.exec_prefix,
    "/usr",
    "/lib",
    "/lib64",
    "/etc",
    "/proc/self",
    "/dev",
    "/sys/devices/system/cpu",
    "/opt",
  ]
  readable += [p for p in sys.path if p and os.path.isabs(p)]
  readable = tuple(os.path.realpath(p) for p in readable)
  scratch = os.path.realpath(scratch)
  writable = (scratch, "/dev/null")

  def inside(path, roots) -> bool:
    try:
      path = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
      return True  # a file descriptor, not a path
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

  def hook(event: str, args: tuple) -> None:
    if event == "open":
      path, mode, flags = args
      if isinstance(path, int):
        return
      writes = (mode and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE_FLAGS
      if not inside(path, writable if writes else readable):
        verb = "writing" if writes else "reading"
        raise PermissionError(
          f"[sandbox] {verb} {os.fsdecode(path)!r} is not allowed outside the working directory"
        )
    elif event in _PATH_EVENTS:
      for path in args[:2]:
        if isinstance(path, (str, bytes, os.PathLike)) and not inside(path, (scratch,)):
          raise PermissionError(
            f"[sandbox] {event} on {os.fsdecode(path)!r} is not allowed outside the working directory"
          )
    elif event in _SPAWN_EVENTS:
      raise PermissionError(f"[sandbox] {event} is not allowed in the sandbox")

  sys.addaudithook(hook)


class Interpreter:
  """A persistent ``__main__`` namespace that runs cells like a notebook kernel."""

  def __init__(self, allowed: list[str] | None):
    self.allowed = None if allowed is None else frozenset(allowed)
    module = types.ModuleType("__main__")
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    self.ns = module.__dict__
    sys.stdout, sys.stderr = _stream(1), _stream(2)
    sys.stdin = open(os.devnull)  # noqa: SIM115
    sys.argv = [""]
    if self.allowed is not None:
      real_import = builtins.__import__

      def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if (globals if globals is not None else sys._getframe(1).f_globals) is self.ns:
          root = name.partition(".")[0]
          if level or root not in self.allowed:
            shown = ("." * level + name) or "."
            raise SandboxPolicyError(f"import of '{shown}' is not allowed by the sandbox policy")
        return real_import(name, globals, locals, fromlist, level)

      builtins.__import__ = guarded_import
      _install_guard(os.getcwd())

  def run_cell(self, code: str, filename: str) -> str:
    """Runs ``code``; returns its status (output goes to fd 1/2)."""
    _Stream.wrote = False
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    try:
      tree = ast.parse(code, filename, "exec")
      last = None
      if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
      exec(compile(tree, filename, "exec"), self.ns)  # noqa: S102
      if last is not None:
        value = eval(compile(last, filename, "eval"), self.ns)  # noqa: S307
        if value is not None and not _Stream.wrote:
          print(repr(value))
      status = "ok"
    except SystemExit as e:
      status = "ok" if e.code in (None, 0) else "error"
      if status == "error":
        sys.stderr.write(f"SystemExit: {e.code}\n")
    except MemoryError as e:
      status = "memory"
      where = _user_line(e.__traceback__)
      del e
      sys.stderr.write(f"MemoryError: the memory limit was exceeded{where}\n")
    except SandboxPolicyError as e:
      status = "policy"
      sys.stderr.write(format_exception(e))
    except BaseException as e:  # noqa: BLE001
      status = "error"
      sys.stderr.write(format_exception(e))
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    except Exception:  # noqa: BLE001, S110
      pass
    return status


def _user_frames(tb) -> list[traceback.FrameSummary]:
  return [f for f in traceback.extract_tb(tb) if f.filename.startswith("<cell")]


def _user_line(tb) -> str:
  frames = _user_frames(tb)
  return f" (line {frames[-1].lineno})" if frames else ""


def format_exception(exc: BaseException) -> str:
  """The traceback restricted to frames of the user's code, then the exception line."""
  if isinstance(exc, SyntaxError):
    return "".join(traceback.format_exception_only(type(exc), exc))
  frames = _user_frames(exc.__traceback__)
  lines = ["Traceback (most recent call last):\n"] if frames else []
  lines += traceback.format_list(frames)
  lines += traceback.format_exception_only(type(exc), exc)
  return "".join(lines)
