"""The HTTP routes (FastAPI): OpenAI's chat completions, completions and models, per-session copies of them,
health, and errors in OpenAI's shape.

    app = create_app(backend)                   # ready now
    app = create_app(load=lambda: backend)      # loads in a thread at start-up; 503 until it is ready

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`; under
`/sessions/<id>/v1` the chat and models routes again, recording the session's trajectory, which
`GET /sessions/<id>/trajectory` returns and `DELETE /sessions/<id>` forgets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import fastapi
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from retool_jax.serve.backend import ServeBackend, stream_completion_chunks
from retool_jax.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body

__all__ = ["create_app"]

log = logging.getLogger(__name__)


class _State:
  def __init__(self, backend: ServeBackend | None):
    self.backend = backend
    self.load_error: str | None = None

  def ready(self) -> ServeBackend:
    if self.backend is None:
      why = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
      raise APIError(503, why, code="model_loading" if self.load_error is None else "model_load_failed")
    return self.backend


def create_app(
  backend: ServeBackend | None = None, *, load: Callable[[], ServeBackend] | None = None
) -> fastapi.FastAPI:
  """The server's ASGI app over `backend`, or over what `load()` returns (run in a thread at start-up)."""
  if (backend is None) == (load is None):
    raise ValueError("give a backend or a load function, not both or neither")
  state = _State(backend)

  @contextlib.asynccontextmanager
  async def lifespan(_: fastapi.FastAPI):
    if load is not None:

      def run() -> None:
        try:
          state.backend = load()
        except Exception as e:  # noqa: BLE001  (reported by /health and every request)
          log.exception("loading the model failed")
          state.load_error = f"{type(e).__name__}: {e}"

      threading.Thread(target=run, name="retool-serve-load", daemon=True).start()
    yield

  app = fastapi.FastAPI(title="retool_jax", lifespan=lifespan)
  app.state.serve = state

  @app.exception_handler(APIError)
  async def _api_error(_: fastapi.Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(RequestValidationError)
  async def _invalid(_: fastapi.Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

  @app.exception_handler(Exception)
  async def _crash(_: fastapi.Request, e: Exception) -> JSONResponse:
    log.exception("request failed")
    return JSONResponse(error_body(f"{type(e).__name__}: {e}", "server_error"), status_code=500)

  @app.get("/health")
  async def health() -> JSONResponse:
    if state.backend is None:
      status = "failed" if state.load_error else "loading"
      return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
    engine_ok = await state.backend.engine.health()
    return JSONResponse({"status": "ok" if engine_ok else "engine_down"}, status_code=200 if engine_ok else 503)

  async def models() -> dict[str, Any]:
    return state.ready().models()

  async def chat(req: ChatCompletionRequest, session: str | None = None) -> Any:
    if req.stream:
      return StreamingResponse(await state.ready().chat_stream(req, session), media_type="text/event-stream")
    return await state.ready().chat(req, session)

  async def completions(req: CompletionRequest) -> Any:
    response = await state.ready().complete(req)
    if req.stream:
      return StreamingResponse(
        stream_completion_chunks(response, req.include_usage()), media_type="text/event-stream"
      )
    return response

  async def plain_chat(req: ChatCompletionRequest) -> Any:
    return await chat(req)

  async def session_chat(session: str, req: ChatCompletionRequest) -> Any:
    return await chat(req, session)

  async def session_models(session: str) -> dict[str, Any]:
    return await models()

  async def trajectory(session: str) -> dict[str, Any]:
    return state.ready().sessions.trajectory(session)

  async def forget(session: str) -> dict[str, Any]:
    state.ready().sessions.pop(session)
    return {"session": session, "deleted": True}

  app.add_api_route("/v1/models", models, methods=["GET"])
  app.add_api_route("/v1/chat/completions", plain_chat, methods=["POST"])
  app.add_api_route("/v1/completions", completions, methods=["POST"])
  app.add_api_route("/sessions/{session}/v1/models", session_models, methods=["GET"])
  app.add_api_route("/sessions/{session}/v1/chat/completions", session_chat, methods=["POST"])
  app.add_api_route("/sessions/{session}/trajectory", trajectory, methods=["GET"])
  app.add_api_route("/sessions/{session}", forget, methods=["DELETE"])

  @app.exception_handler(404)
  async def _not_found(request: fastapi.Request, _: Exception) -> JSONResponse:
    return JSONResponse(
      error_body(f"no route {request.method} {request.url.path}", "not_found_error"), status_code=404
    )

  return app


async def wait_ready(app: fastapi.FastAPI, timeout_s: float = 600.0) -> ServeBackend:
  """Waits until the app's backend is loaded (raises what loading raised, as a RuntimeError)."""
  state: _State = app.state.serve
  deadline = asyncio.get_running_loop().time() + timeout_s
  while state.backend is None:
    if state.load_error:
      raise RuntimeError(state.load_error)
    if asyncio.get_running_loop().time() > deadline:
      raise TimeoutError(f"the model did not load within {timeout_s:g} s")
    await asyncio.sleep(0.05)
  return state.backend
