"""Running parsed calls: one observation text per parsed item, in the order the model wrote them."""

from __future__ import annotations

import asyncio
from typing import Any

from retool_jax.chat.parse import CallError, ParseResult


async def call_outputs(parsed: ParseResult, registry: Any) -> list[str]:
  """Tool outputs for the valid calls (run concurrently) and error messages for the rest, in text order.

  `registry.call(name, arguments)` is awaited and must return an object with `.output` (it never raises).
  """

  async def one(item: Any) -> str:
    if isinstance(item, CallError):
      return item.message
    return (await registry.call(item.name, item.arguments)).output

  return list(await asyncio.gather(*(one(item) for item in parsed.items)))
