"""Sessions: one recorded trajectory per client conversation (`/sessions/<id>/v1`).

A session is a `ChatClient`: a request whose messages extend the session's conversation reuses its ids as they
are and tokenises only the new environment messages; generated ids, their log-probs and versions are
recorded, with loss mask 1 on generated tokens and 0 on everything else. `trajectory()` is what a trainer
reads (the RL trainer reads the client itself, in process).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from retool_jax.serve.protocol import APIError

__all__ = ["Sessions"]

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class Sessions:
  """Session id -> its `ChatClient`, made on first use by `make_client(seed)`."""

  def __init__(self, make_client: Callable[[int | None], Any]):
    self._make = make_client
    self._clients: dict[str, Any] = {}

  def add(self, session_id: str, client: Any) -> None:
    """Registers a client made elsewhere (e.g. seeded as an in-process rollout seeds it)."""
    self._check(session_id)
    if session_id in self._clients:
      raise ValueError(f"session {session_id!r} already exists")
    self._clients[session_id] = client

  def get(self, session_id: str) -> Any:
    self._check(session_id)
    if session_id not in self._clients:
      self._clients[session_id] = self._make(None)
    return self._clients[session_id]

  def pop(self, session_id: str) -> Any:
    if session_id not in self._clients:
      raise APIError(404, f"no session {session_id!r}", param="session", code="session_not_found")
    return self._clients.pop(session_id)

  def __contains__(self, session_id: str) -> bool:
    return session_id in self._clients

  def __len__(self) -> int:
    return len(self._clients)

  def trajectory(self, session_id: str) -> dict[str, Any]:
    """The session's recorded segments: ids, loss mask, log-probs, prompt length, weight versions, truncation."""
    if session_id not in self._clients:
      raise APIError(404, f"no session {session_id!r}", param="session", code="session_not_found")
    return {
      "session": session_id,
      "segments": [
        {
          "ids": s.ids,
          "loss_mask": s.loss_mask,
          "logprobs": s.logprobs,
          "num_prompt_tokens": s.num_prompt_tokens,
          "versions": s.versions,
          "truncated": s.truncated,
        }
        for s in self._clients[session_id].segments
      ],
    }

  @staticmethod
  def _check(session_id: str) -> None:
    if not _ID.fullmatch(session_id):
      raise APIError(400, f"session id {session_id!r} must be 1-128 of A-Z a-z 0-9 . _ : -", param="session")
