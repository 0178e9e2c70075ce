"""The remote backend against a local double of the SandboxFusion ``/run_code`` service."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading

import pytest

from retool_jax.sandbox import Limits, Sandbox, create_sandbox
from retool_jax.sandbox.remote import RemoteSandbox, with_value_display


@pytest.fixture(scope="module")
def service():
  """Answers like SandboxFusion: ``status`` Success/Failed, ``run_result`` with status Finished /
  TimeLimitExceeded, return_code, stdout and stderr. Code runs in a local sandbox without REPL display."""
  backend = Sandbox("process", policy=None, max_workers=2, warm_workers=1)
  requests = []

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      requests.append(body)
      if self.path != "/run_code" or body.get("language") not in ("python", "bash"):
        self.send_response(404)
        self.end_headers()
        return
      lim = Limits(timeout_s=body["run_timeout"], memory_mb=body["memory_limit_MB"])
      if body["language"] == "bash":
        res = backend.run_command(body["code"], limits=lim)
      else:  # a plain script: show nothing for a bare final expression
        res = backend.run(body["code"] + "\npass", limits=lim)
      run_status = "TimeLimitExceeded" if res.status == "timeout" else "Finished"
      code = 0 if res.status == "ok" else 1
      stdout, stderr = (res.output, "") if res.status == "ok" else ("", res.output)
      reply = {
        "status": "Success" if res.ok else "Failed",
        "message": "",
        "compile_result": None,
        "run_result": {
          "status": run_status,
          "execution_time": res.elapsed_s,
          "return_code": code,
          "stdout": stdout,
          "stderr": stderr,
        },
        "files": {},
      }
      data = json.dumps(reply).encode()
      self.send_response(200)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}", requests
  server.shutdown()
  backend.close()


def test_remote_statuses_and_payload(service):
  url, requests = service
  remote = create_sandbox("remote", url=url, limits=Limits(timeout_s=2.0, memory_mb=256))
  assert isinstance(remote, RemoteSandbox)
  ok = remote.run("x = 6\nx * 7")
  assert (ok.status, ok.output, ok.backend) == ("ok", "42\n", "remote")
  assert requests[-1]["language"] == "python" and requests[-1]["run_timeout"] == 2.0
  assert requests[-1]["memory_limit_MB"] == 256
  err = remote.run("1/0")
  assert err.status == "error" and "ZeroDivisionError" in err.output
  slow = remote.run("while True:\n    pass", timeout_s=0.5)
  assert slow.status == "timeout"
  assert remote.run("import os").status == "policy"  # refused before any request
  assert remote.run_command("echo hi").output == "hi\n"
  with pytest.raises(NotImplementedError, match="sessions"):
    remote.session()


def test_remote_concurrency_and_unreachable(service):
  url, _ = service
  remote = RemoteSandbox(url, max_concurrency=4)

  async def many():
    return await asyncio.gather(*(remote.run_async(f"print({i})") for i in range(8)))

  assert [r.output for r in asyncio.run(many())] == [f"{i}\n" for i in range(8)]
  down = RemoteSandbox("http://127.0.0.1:9", request_timeout_s=2).run("print(1)")
  assert down.status == "killed" and "remote sandbox" in down.output
  with pytest.raises(ValueError, match="http"):
    RemoteSandbox("ftp://x")
  with pytest.raises(ValueError, match="RETOOL_SANDBOX_URL"):
    create_sandbox("remote")


def test_value_display_rewrite():
  assert (
    with_value_display("x = 2\nx + 1")
    == "x = 2\n__value = (x + 1)\nif __value is not None:\n    print(repr(__value))\n"
  )
  assert with_value_display("print(1)\n2") == "print(1)\n2"
  assert with_value_display("x = 1") == "x = 1"
