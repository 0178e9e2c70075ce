"""A client for a SandboxFusion-compatible ``POST /run_code`` service, for scaling out."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from retool_jax.sandbox.limits import ExecResult, Limits
from retool_jax.sandbox.policy import DEFAULT_POLICY, ModulePolicy
from retool_jax.sandbox.pool import Sandbox
from retool_jax.sandbox.worker import Output


def with_value_display(code: str) -> str:
  """Appends REPL-style display of a final expression for services that run a plain script.

  The script has no way to tell whether anything was printed, so the value is shown only
  when the code contains no ``print`` call.
  """
  try:
    tree = ast.parse(code)
  except SyntaxError:
    return code
  if not tree.body or not isinstance(tree.body[-1], ast.Expr):
    return code
  if any(isinstance(n, ast.Name) and n.id == "print" for n in ast.walk(tree)):
    return code
  last = tree.body[-1]
  lines = code.splitlines()
  head = "\n".join(lines[: last.lineno - 1])
  expr = ast.get_source_segment(code, last.value)
  tail = "\n".join(lines[last.end_lineno :])
  return (f"{head}\n__value = ({expr})\nif __value is not None:\n    print(repr(__value))\n{tail}").lstrip("\n")


def map_response(body: dict, lim: Limits) -> tuple[str, str]:
  """(status, output) from a SandboxFusion ``RunCodeResponse``."""
  run = body.get("run_result") or {}
  out = Output(lim.max_output_bytes, lim.head_fraction)
  out.feed((run.get("stdout") or "").encode())
  out.feed((run.get("stderr") or "").encode())
  text = out.text()
  if body.get("status") == "SandboxError":
    return "killed", text + f"Killed: the remote sandbox failed: {body.get('message', '')}\n"
  run_status, code = run.get("status"), run.get("return_code")
  if run_status == "TimeLimitExceeded":
    return "timeout", text + f"TimeoutError: the call exceeded its wall-time limit of {lim.timeout_s:g} s\n"
  if "MemoryError" in (run.get("stderr") or ""):
    return "memory", text
  if run_status == "Finished" and code == 0:
    return "ok", text
  if isinstance(code, int) and code < 0:
    return "killed", text + f"Killed: the process was terminated by signal {-code}\n"
  return "error", text


class RemoteSandbox:
  """Same call API as :class:`~retool_jax.sandbox.Sandbox`, executed by a remote service.

  Isolation is whatever the service provides. Stateful sessions are not offered.
  """

  backend_name = "remote"

  def __init__(
    self,
    url: str,
    *,
    limits: Limits | None = None,
    policy: ModulePolicy | None = DEFAULT_POLICY,
    max_concurrency: int = 32,
    request_timeout_s: float = 30.0,
  ):
    if not url.startswith(("http://", "https://")):
      raise ValueError(f"remote sandbox url must start with http:// or https://, got {url!r}")
    self.url = url.rstrip("/") + "/run_code"
    self.limits = limits or Limits()
    self.policy = policy
    self.request_timeout_s = request_timeout_s
    self._max_concurrency = max_concurrency
    self._sems: dict[int, asyncio.Semaphore] = {}

  def _post(self, payload: dict, timeout_s: float) -> dict:
    req = urllib.request.Request(
      self.url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310
      return json.loads(resp.read())

  async def _send(self, payload: dict, lim: Limits) -> ExecResult:
    loop = asyncio.get_running_loop()
    sem = self._sems.setdefault(id(loop), asyncio.Semaphore(self._max_concurrency))
    start = time.monotonic()
    async with sem:
      try:
        body = await asyncio.to_thread(self._post, payload, lim.timeout_s + self.request_timeout_s)
      except (urllib.error.URLError, OSError, ValueError) as e:
        return ExecResult(
          "killed", f"Killed: the remote sandbox at {self.url} failed: {e}\n", time.monotonic() - start, "remote"
        )
    status, output = map_response(body, lim)
    return ExecResult(status, output, time.monotonic() - start, "remote")

  async def run_async(
    self, code: str, *, limits: Limits | None = None, policy: Any = "default", **overrides: Any
  ) -> ExecResult:
    policy = self.policy if policy == "default" else policy
    lim = (limits or self.limits).replace(**overrides)
    if policy is not None and (violation := policy.check(code)) is not None:
      return ExecResult("policy", policy.message(violation), backend="remote")
    payload = {
      "code": with_value_display(code),
      "language": "python",
      "run_timeout": lim.timeout_s,
      "memory_limit_MB": lim.memory_mb,
      "compile_timeout": lim.timeout_s,
    }
    return await self._send(payload, lim)

  def run(self, code: str, **kwargs: Any) -> ExecResult:
    return asyncio.run(self.run_async(code, **kwargs))

  async def run_command_async(self, command: str, *, limits: Limits | None = None, **overrides: Any) -> ExecResult:
    lim = (limits or self.limits).replace(**overrides)
    payload = {"code": command, "language": "bash", "run_timeout": lim.timeout_s, "memory_limit_MB": lim.memory_mb}
    return await self._send(payload, lim)

  def run_command(self, command: str, **kwargs: Any) -> ExecResult:
    return asyncio.run(self.run_command_async(command, **kwargs))

  def session(self, **_: Any):
    raise NotImplementedError(
      "the remote backend does not offer stateful sessions; use backend='bwrap' or 'process'"
    )

  def close(self) -> None:
    self._sems.clear()


def create_sandbox(backend: str = "auto", **kwargs: Any):
  """A :class:`Sandbox` for ``auto``/``bwrap``/``process``, a :class:`RemoteSandbox` for
  ``remote`` (``url=`` or ``RETOOL_SANDBOX_URL``)."""
  if backend == "remote":
    url = kwargs.pop("url", None) or os.environ.get("RETOOL_SANDBOX_URL")
    if not url:
      raise ValueError("backend 'remote' needs url=... or the RETOOL_SANDBOX_URL environment variable")
    allowed = {"limits", "policy", "max_concurrency", "request_timeout_s"}
    return RemoteSandbox(url, **{k: v for k, v in kwargs.items() if k in allowed})
  return Sandbox(backend, **kwargs)
