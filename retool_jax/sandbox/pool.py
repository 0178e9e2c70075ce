"""The sandbox: a pool of warm workers behind an async API with a concurrency limit."""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from retool_jax.sandbox.backends import BACKEND_VAR, TOKEN_VAR, select_backend, worker_config, worker_env
from retool_jax.sandbox.limits import ExecResult, Limits
from retool_jax.sandbox.policy import DEFAULT_POLICY, ModulePolicy
from retool_jax.sandbox.worker import CallLimits, Reply, Request, descendants, process_table

T = TypeVar("T")

DEFAULT_PRELOAD = ("numpy", "sympy", "scipy", "fractions", "decimal", "statistics", "itertools")
_START_TIMEOUT_S = 120.0
_REPLY_GRACE_S = 10.0
_CLOSE_CREATING_S = 5.0


_HAVE_PROC = os.path.exists("/proc/self/stat")
# Worker process creations in flight: closing the sandbox lets them finish (see _Worker.start).
_CREATING: weakref.WeakSet[asyncio.Future] = weakref.WeakSet()


class WorkerDied(Exception):
  """The worker process exited or stopped answering; ``started`` says whether it had the call."""

  def __init__(self, message: str, started: bool = True):
    super().__init__(message)
    self.started = started


class _Worker:
  """One warm worker process and its line-based JSON channel."""

  def __init__(self, proc: asyncio.subprocess.Process, backend, scratch: str | None, token: str):
    self.proc = proc
    self.backend = backend
    self.scratch = scratch
    self.token = token
    self.stderr_tail: collections.deque[bytes] = collections.deque(maxlen=32)
    self._stderr_task = asyncio.get_running_loop().create_task(self._read_stderr())

  @classmethod
  async def start(cls, backend, limits: Limits, preload: tuple[str, ...]) -> _Worker:
    token = secrets.token_hex(8)
    scratch = backend.make_scratch()
    env = worker_env(token)
    config = worker_config(backend.scratch_in_worker(scratch), preload, env, backend)
    argv = backend.command(json.dumps(config.to_wire()), limits.scratch_mb, env)
    creating = asyncio.ensure_future(
      asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
        limit=1 << 26,
      )
    )
    # A cancelled process creation can wait forever for the child's exit, and one started while the
    # interpreter exits may never finish: closing does not cancel it, waits for it only briefly, and the
    # worker it makes is killed when it is made.
    _CREATING.add(creating)
    try:
      proc = await asyncio.shield(creating)
    except asyncio.CancelledError:
      creating.add_done_callback(functools.partial(_kill_created, scratch=scratch))
      raise
    worker = cls(proc, backend, scratch, token)
    try:
      line = await asyncio.wait_for(proc.stdout.readline(), _START_TIMEOUT_S)
      if not json.loads(line or b"{}").get("ready"):
        raise WorkerDied("no ready message")
    except asyncio.CancelledError:  # e.g. the sandbox closed while this worker was starting
      await worker.kill()
      raise
    except (asyncio.TimeoutError, ValueError, WorkerDied) as e:
      await worker.kill()
      detail = b"".join(worker.stderr_tail).decode(errors="replace").strip()
      raise RuntimeError(f"sandbox worker ({backend.name}) failed to start: {e!r} {detail}") from None
    return worker

  async def _read_stderr(self) -> None:
    while chunk := await self.proc.stderr.read(4096):
      self.stderr_tail.append(chunk)

  def healthy(self) -> bool:
    """False for a worker that has exited, or is a zombie or stopped (seen in /proc where there is one)."""
    if self.proc.returncode is not None:
      return False
    try:
      with open(f"/proc/{self.proc.pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
      return not _HAVE_PROC
    except (OSError, IndexError):
      return True
    return state not in ("Z", "X", "T", "t")

  async def request(self, request: Request, timeout_s: float) -> Reply:
    if self.proc.returncode is not None:
      raise WorkerDied(f"worker exited with {self.proc.returncode}", started=False)
    try:
      self.proc.stdin.write((json.dumps(request.to_wire()) + "\n").encode())
      await self.proc.stdin.drain()
    except (ConnectionError, OSError) as e:
      raise WorkerDied(f"worker pipe broke: {e}", started=False) from None
    try:
      line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
    except asyncio.TimeoutError:
      raise WorkerDied("worker did not answer in time") from None
    except (ConnectionError, OSError) as e:
      raise WorkerDied(f"worker pipe broke: {e}") from None
    if not line:
      raise WorkerDied("worker exited")
    return Reply.from_wire(json.loads(line))

  async def kill(self) -> None:
    """Kills the worker, everything it started, and removes its scratch directory."""
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
    try:
      await asyncio.wait_for(self.proc.wait(), 10)
    except asyncio.TimeoutError:
      pass
    if self.backend.name == "process":
      await asyncio.to_thread(kill_marked, self.token)
    if self.scratch:
      shutil.rmtree(self.scratch, ignore_errors=True)
    self._stderr_task.cancel()
    transport = getattr(self.proc, "_transport", None)
    if transport is not None:  # close the pipes on this loop, not in a finaliser at interpreter exit
      transport.close()

  async def stop(self) -> None:
    """Asks the worker to exit (it cleans up its calls), then kills what is left."""
    try:
      self.proc.stdin.close()
      await asyncio.wait_for(self.proc.wait(), 2)
    except (asyncio.TimeoutError, OSError):
      pass
    await self.kill()


def _kill_created(creating: asyncio.Future, scratch: str | None) -> None:
  """Kills a worker whose start was abandoned while its process was being created."""
  if scratch:
    shutil.rmtree(scratch, ignore_errors=True)
  if creating.cancelled() or creating.exception() is not None:
    return
  proc = creating.result()
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  transport = getattr(proc, "_transport", None)
  if transport is not None:
    transport.close()


def kill_marked(token: str) -> int:
  """SIGKILLs processes whose environment carries a worker's token (strays of a dead
  process-backend worker that escaped its session); returns how many."""
  needle = f"{TOKEN_VAR}={token}".encode()
  killed = 0
  for _ in range(20):
    victims = []
    for name in os.listdir("/proc"):
      if name.isdigit():
        try:
          with open(f"/proc/{name}/environ", "rb") as f:
            if needle in f.read().split(b"\0"):
              victims.append(int(name))
        except OSError:
          pass
    if not victims:
      break
    for pid in victims:
      try:
        os.kill(pid, signal.SIGKILL)
        killed += 1
      except (ProcessLookupError, PermissionError):
        pass
  return killed


def _to_result(reply: Reply, backend: str) -> ExecResult:
  return ExecResult(reply.status, reply.output, float(reply.elapsed_s), backend, int(reply.truncated_bytes or 0))


def _request(op: str, code: str, lim: Limits, policy: ModulePolicy | None) -> Request:
  """A ``run`` or ``cell`` request for Python ``code`` under ``lim``, with ``policy``'s allow-list."""
  allowed = None if policy is None else sorted(policy.allowed)
  return Request(op, CallLimits.from_wire(lim.to_wire()), code=code, allowed=allowed)


def _refusal(code: str, policy: ModulePolicy | None, backend: str) -> ExecResult | None:
  """The ``policy`` result for ``code`` that imports a module outside the allow-list, else None."""
  if policy is None:
    return None
  violation = policy.check(code)
  if violation is None:
    return None
  return ExecResult("policy", policy.message(violation), backend=backend)


class _LoopThread:
  """An asyncio event loop on its own daemon thread: the sandbox's workers and sessions live on it, and
  coroutines from other threads and other event loops are run there."""

  def __init__(self, name: str):
    self.loop = asyncio.new_event_loop()
    self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
    self.thread.start()
    self.closed = False  # set when the sandbox closes: nothing new is run from then on

  def submit(self, coro: Coroutine[Any, Any, T], wait: bool = True) -> T | concurrent.futures.Future:
    """Runs ``coro`` on the loop from another thread; returns its result, or a future with ``wait=False``."""
    if self.closed:
      coro.close()
      raise RuntimeError("the sandbox is closed")
    future = asyncio.run_coroutine_threadsafe(coro, self.loop)
    return future.result() if wait else future

  def _on_loop(self) -> bool:
    try:
      return asyncio.get_running_loop() is self.loop
    except RuntimeError:
      return False

  async def run(self, coro: Coroutine[Any, Any, T]) -> T:
    """Awaits ``coro`` on the loop, from any event loop (that one included)."""
    if self._on_loop():
      return await coro
    return await asyncio.wrap_future(self.submit(coro, wait=False))

  def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
    """Runs ``coro`` on the loop and blocks until it is done; not from inside the loop itself."""
    if self._on_loop():
      coro.close()
      raise RuntimeError("use the async API from inside the sandbox's event loop")
    return self.submit(coro)

  def stop(self) -> None:
    self.closed = True
    self.loop.call_soon_threadsafe(self.loop.stop)
    self.thread.join(timeout=10)


class _SessionWorkers:
  """Dedicated workers for sessions, at most ``max_sessions`` at once; ``spawn`` starts a worker of the
  sandbox and ``discard`` kills one."""

  def __init__(
    self,
    spawn: Callable[[], Awaitable[_Worker]],
    discard: Callable[[_Worker], Awaitable[None]],
    max_sessions: int,
  ):
    self._spawn = spawn
    self._discard = discard
    self._slots = asyncio.Semaphore(max_sessions)

  async def start(self) -> _Worker:
    """A started worker, once a session slot is free."""
    await self._slots.acquire()
    try:
      return await self._spawn()
    except BaseException:
      self._slots.release()
      raise

  async def stop(self, worker: _Worker) -> None:
    """Kills a session's worker and frees its slot."""
    await self._discard(worker)
    self._slots.release()


class Sandbox:
  """Runs untrusted Python (or shell commands) in warm, isolated workers.

  Args:
    backend: ``"auto"`` (bubblewrap where it works, else ``"process"`` with a logged warning), ``"bwrap"``
      (raises when bubblewrap cannot run here) or ``"process"``. ``backend_reason`` says why it runs.
    limits: default per-call limits; each call may override fields.
    policy: module allow-list checked before running code; ``None`` disables it.
    max_workers: the concurrency limit of stateless calls.
    warm_workers: workers kept started and ready; defaults to ``max_workers``.
    preload: modules imported by each worker before it takes calls.
    max_sessions: the number of stateful sessions open at once.
    reply_grace_s: how long past its time limit a call may go unanswered before its worker is
      declared hung, killed and replaced.

  Its sessions use ``loop_thread`` (the event loop every worker lives on) and ``session_workers``.
  """

  def __init__(
    self,
    backend: str = "auto",
    *,
    limits: Limits | None = None,
    policy: ModulePolicy | None = DEFAULT_POLICY,
    max_workers: int | None = None,
    warm_workers: int | None = None,
    preload: tuple[str, ...] = DEFAULT_PRELOAD,
    max_sessions: int = 64,
    reply_grace_s: float = _REPLY_GRACE_S,
  ):
    self.backend, self.backend_reason = select_backend(backend)
    self.limits = limits or Limits()
    self.policy = policy
    self.max_workers = max_workers or max(2, os.cpu_count() or 2)
    if self.max_workers < 1:
      raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    self.warm_workers = self.max_workers if warm_workers is None else min(warm_workers, self.max_workers)
    self.preload = tuple(preload)
    self.reply_grace_s = reply_grace_s
    self.loop_thread = _LoopThread("retool-sandbox")
    self._workers: set[_Worker] = set()
    self._alive = 0
    self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
    self._sem = asyncio.Semaphore(self.max_workers)
    self.session_workers = _SessionWorkers(self._spawn, self._discard, max_sessions)
    atexit.register(self.close)
    self.loop_thread.submit(self._top_up(), wait=False)

  @property
  def backend_name(self) -> str:
    return self.backend.name

  @property
  def closed(self) -> bool:
    return self.loop_thread.closed

  # -- the pool ----------------------------------------------------------------------

  async def _spawn(self) -> _Worker:
    worker = await _Worker.start(self.backend, self.limits, self.preload)
    self._workers.add(worker)
    return worker

  async def _top_up(self) -> None:
    while self._alive < self.warm_workers and not self.closed:
      self._alive += 1
      try:
        worker = await self._spawn()
      except Exception:  # noqa: BLE001  (the next call will spawn and report the error)
        self._alive -= 1
        return
      self._idle.put_nowait(worker)

  async def _acquire(self) -> _Worker:
    while True:
      if not self._idle.empty():
        worker = self._idle.get_nowait()
        if worker.healthy():
          return worker
        self._alive -= 1  # killed or stopped while idle: replace it before anyone calls it
        await self._discard(worker)
        continue
      if self._alive < self.max_workers:
        self._alive += 1
        try:
          return await self._spawn()
        except BaseException:
          self._alive -= 1
          raise
      try:
        return await asyncio.wait_for(self._idle.get(), 0.5)
      except asyncio.TimeoutError:
        continue

  async def _discard(self, worker: _Worker) -> None:
    self._workers.discard(worker)
    await worker.kill()

  async def _run(self, request: Request, limits: Limits) -> ExecResult:
    async with self._sem:
      for attempt in range(3):
        worker = await self._acquire()
        try:
          reply = await worker.request(request, limits.timeout_s + self.reply_grace_s)
        except (WorkerDied, asyncio.CancelledError) as e:
          self._alive -= 1
          await self._discard(worker)
          if isinstance(e, asyncio.CancelledError):
            raise
          self.loop_thread.loop.create_task(self._top_up())
          if not e.started and attempt < 2:
            continue  # the call never reached the worker: run it on another one
          return ExecResult(
            "killed", f"Killed: the sandbox worker died during the call ({e})", backend=self.backend_name
          )
        self._idle.put_nowait(worker)
        return _to_result(reply, self.backend_name)
    raise AssertionError("unreachable")

  # -- public API --------------------------------------------------------------------

  def _limits(self, limits: Limits | None, overrides: dict[str, Any]) -> Limits:
    return (limits or self.limits).replace(**overrides)

  async def run_async(
    self, code: str, *, limits: Limits | None = None, policy: Any = "default", **overrides: Any
  ) -> ExecResult:
    """Runs ``code`` in a fresh interpreter forked from a warm worker.

    ``overrides`` are fields of :class:`Limits` (``timeout_s=2``, ``memory_mb=256``, ...).
    """
    policy = self.policy if policy == "default" else policy
    lim = self._limits(limits, overrides)
    refused = _refusal(code, policy, self.backend_name)
    if refused is not None:
      return refused
    return await self.loop_thread.run(self._run(_request("run", code, lim, policy), lim))

  def run(
    self, code: str, *, limits: Limits | None = None, policy: Any = "default", **overrides: Any
  ) -> ExecResult:
    """Blocking form of :meth:`run_async`."""
    return self.loop_thread.run_sync(self.run_async(code, limits=limits, policy=policy, **overrides))

  async def run_command_async(self, command: str, *, limits: Limits | None = None, **overrides: Any) -> ExecResult:
    """Runs a shell command with ``bash -c`` under the same isolation and limits."""
    lim = self._limits(limits, overrides)
    bash = shutil.which("bash") or "/bin/bash"
    request = Request("run", CallLimits.from_wire(lim.to_wire()), argv=[bash, "-c", command])
    return await self.loop_thread.run(self._run(request, lim))

  def run_command(self, command: str, *, limits: Limits | None = None, **overrides: Any) -> ExecResult:
    return self.loop_thread.run_sync(self.run_command_async(command, limits=limits, **overrides))

  def session(self, *, limits: Limits | None = None, policy: Any = "default") -> Session:
    """A persistent interpreter: variables survive across calls until :meth:`Session.close`."""
    return Session(self, limits or self.limits, self.policy if policy == "default" else policy)

  async def warmup_async(self) -> None:
    """Waits until ``warm_workers`` workers are started and ready."""

    async def wait():
      await self._top_up()
      while self._idle.qsize() < min(self.warm_workers, self._alive):
        await asyncio.sleep(0.02)

    await self.loop_thread.run(wait())

  def warmup(self) -> None:
    self.loop_thread.run_sync(self.warmup_async())

  def worker_pids(self) -> list[int]:
    """Process ids of the live workers (the outer process for bwrap)."""
    return [w.proc.pid for w in list(self._workers) if w.proc.returncode is None]

  def stray_processes(self) -> list[int]:
    """Live processes below the workers other than the workers themselves; empty between calls."""
    table = process_table()
    found = []
    for worker in list(self._workers):
      alive = [p for p in descendants(worker.proc.pid, table) if table[p][1] != "Z"]
      found += alive[1:] if self.backend_name == "bwrap" else alive  # bwrap -> worker is expected
    return found

  def close(self) -> None:
    """Stops every worker and session; leaves no process or file behind."""
    if self.closed:
      return

    async def shutdown():
      self.loop_thread.closed = True  # no new workers from here on
      others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and t not in _CREATING]
      for task in others:  # warm-up and stderr readers; their workers are stopped below
        task.cancel()
      await asyncio.gather(*others, return_exceptions=True)
      creating = [t for t in _CREATING if t.get_loop() is self.loop_thread.loop and not t.done()]
      if creating:  # abandoned starts: their workers are killed as they complete (bounded: see _Worker.start)
        await asyncio.wait(creating, timeout=_CLOSE_CREATING_S)
        await asyncio.sleep(0)
      await asyncio.gather(*(w.stop() for w in list(self._workers)), return_exceptions=True)
      self._workers.clear()

    try:
      asyncio.run_coroutine_threadsafe(shutdown(), self.loop_thread.loop).result(timeout=60)
    finally:
      self.loop_thread.stop()
      atexit.unregister(self.close)

  def __enter__(self) -> Sandbox:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Session:
  """One persistent interpreter (a notebook kernel) with the sandbox's limits per call.

  Its worker is dedicated to it; a call that times out or crashes restarts the interpreter
  (the output says so). Close it when the trajectory ends.
  """

  def __init__(self, sandbox: Sandbox, limits: Limits, policy: ModulePolicy | None):
    self.sandbox = sandbox
    self.limits = limits
    self.policy = policy
    self._loop = sandbox.loop_thread
    self._workers = sandbox.session_workers
    self._worker: _Worker | None = None
    self._lock: asyncio.Lock | None = None
    self._restarted = False
    self.closed = False

  async def _cell(self, request: Request, lim: Limits) -> ExecResult:
    if self._lock is None:
      self._lock = asyncio.Lock()
    async with self._lock:
      if self.closed:
        raise RuntimeError("the session is closed")
      if self._worker is None:
        self._worker = await self._workers.start()
      request = dataclasses.replace(request, restarted=self._restarted)
      try:
        reply = await self._worker.request(request, lim.timeout_s + self.sandbox.reply_grace_s)
      except WorkerDied as e:
        await self._drop_worker()
        self._restarted = True
        return ExecResult(
          "killed",
          f"Killed: the sandbox worker died during the call ({e})\n"
          "[the interpreter will restart; variables from earlier calls are gone]",
          backend=self.sandbox.backend_name,
        )
      self._restarted = not reply.session_alive
      return _to_result(reply, self.sandbox.backend_name)

  async def _drop_worker(self) -> None:
    if self._worker is not None:
      worker, self._worker = self._worker, None
      await self._workers.stop(worker)

  async def run_async(self, code: str, **overrides: Any) -> ExecResult:
    lim = self.limits.replace(**overrides)
    refused = _refusal(code, self.policy, self.sandbox.backend_name)
    if refused is not None:
      return refused
    return await self._loop.run(self._cell(_request("cell", code, lim, self.policy), lim))

  def run(self, code: str, **overrides: Any) -> ExecResult:
    return self._loop.run_sync(self.run_async(code, **overrides))

  async def run_command_async(self, command: str, **overrides: Any) -> ExecResult:
    """Runs a shell command with the session's limits; commands keep no state, so it runs in a fresh call."""
    if self.closed:
      raise RuntimeError("the session is closed")
    return await self.sandbox.run_command_async(command, limits=self.limits, **overrides)

  def run_command(self, command: str, **overrides: Any) -> ExecResult:
    return self._loop.run_sync(self.run_command_async(command, **overrides))

  async def aclose(self) -> None:
    async def close():
      self.closed = True
      await self._drop_worker()

    if not self._loop.closed:
      await self._loop.run(close())

  def close(self) -> None:
    if not self._loop.closed and not self.closed:
      self._loop.run_sync(self.aclose())

  def __enter__(self) -> Session:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  async def __aenter__(self) -> Session:
    return self

  async def __aexit__(self, *exc) -> None:
    await self.aclose()


_DEFAULT: Sandbox | None = None
_DEFAULT_LOCK = threading.Lock()


def default_sandbox() -> Sandbox:
  """The process-wide sandbox (backend from ``RETOOL_SANDBOX_BACKEND``, default ``auto``)."""
  global _DEFAULT
  with _DEFAULT_LOCK:
    if _DEFAULT is None or _DEFAULT.closed:
      _DEFAULT = Sandbox(os.environ.get(BACKEND_VAR) or "auto")
    return _DEFAULT


def run_python(
  code: str, timeout_s: float | None = None, memory_mb: int | None = None, **overrides: Any
) -> ExecResult:
  """Runs ``code`` in the default sandbox; ``.status`` is one of ok, error, timeout, memory,
  killed, policy and ``.output`` holds stdout and stderr."""
  return default_sandbox().run(code, timeout_s=timeout_s, memory_mb=memory_mb, **overrides)
