"""A scripted `Engine` for loop-logic tests: it plays back fixed turn texts, honouring the request exactly.

Each script is a list of turn texts for one conversation, recognised by its prompt ids. A request continues the
conversation whose prompt it starts with (the longest such) and gets the next text, tokenised and cut the way a real engine cuts:
at a stop token id (kept), at the token that completes a stop string (kept), or at `max_new_tokens`; a text cut
by `max_new_tokens` is continued by the next request, as a model would continue it. Log-probs are deterministic (`-(position + 1) / 100`), so tests can check they are carried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from retool_jax.rollout.sampling import find_stop_string
from retool_jax.rollout.types import FinishReason, GenerateRequest, GenerateResult


class ScriptedEngine:
  def __init__(
    self,
    tokenizer,
    scripts: dict[tuple[int, ...], list[str]],
    *,
    seconds_per_token: float = 0.0,
    weight_version: int = 0,
  ):
    self.tokenizer = tokenizer
    self.scripts = {tuple(k): [tokenizer.encode(t) for t in v] for k, v in scripts.items()}
    self.cursor = {k: (0, 0) for k in self.scripts}  # (text index, token offset)
    self.seconds_per_token = seconds_per_token
    self.weight_version = weight_version
    self.log: list[tuple[float, float, tuple[int, ...]]] = []  # (start, end, prompt prefix) per request
    self.requests: list[GenerateRequest] = []

  async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
    return list(await asyncio.gather(*(self._one(r) for r in requests)))

  async def update_weights(self, params, version: int) -> None:
    self.weight_version = version

  async def health(self) -> bool:
    return True

  async def _one(self, r: GenerateRequest) -> GenerateResult:
    self.requests.append(r)
    start = time.perf_counter()
    key = max((k for k in self.scripts if tuple(r.prompt_ids[: len(k)]) == k), key=len, default=None)
    if key is None or self.cursor[key][0] >= len(self.scripts[key]):
      return GenerateResult([], [], FinishReason("abort", message="no scripted turn left"), self.weight_version)
    text, offset = self.cursor[key]
    ids = self.scripts[key][text][offset:]
    out, reason = [], FinishReason("length")
    for i, tok in enumerate(ids[: r.sampling.max_new_tokens]):
      out.append(tok)
      if tok in r.sampling.stop_token_ids:
        reason = FinishReason("stop", tok)
        break
      hit = find_stop_string(out, i, r.sampling.stop, self.tokenizer.decode)
      if hit is not None:
        reason = FinishReason("stop", hit[1])
        break
    else:
      if len(out) < r.sampling.max_new_tokens:
        reason = FinishReason("stop", None)  # the script ran out: treat as a natural end
    self.cursor[key] = (text, offset + len(out)) if reason.type == "length" else (text + 1, 0)
    await asyncio.sleep(self.seconds_per_token * len(out))
    self.log.append((start, time.perf_counter(), key))
    return GenerateResult(out, [-(i + 1) / 100 for i in range(len(out))], reason, self.weight_version)
