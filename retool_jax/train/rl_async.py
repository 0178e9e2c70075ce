"""The rollout producer of an asynchronous RL run (`rl.max_staleness = K >= 1`).

A thread runs the trainer's event loop; on it, a producer task samples rollout batch after batch, each the
whole groups of one prompt batch, scored, and queues them. Batch `i` may start once the trainer has made
update `i - K`, so it trains on weights at most `K` versions old; the trainer takes batches in order and
drops (and counts) any that got older than that. Weight updates are sent to the engine on the same loop while
the producer runs: the engine swaps them in between two decode chunks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any


@dataclasses.dataclass
class Produced:
  """One sampled batch: its draw index, the policy version it started on, what the sampler returned, and the
  data position after its prompts were drawn."""

  index: int
  version: int
  result: Any
  position: dict[str, Any]


class RolloutProducer:
  """Samples batches ahead of the trainer, at most `max_staleness` versions ahead.

  Args:
    loop: the event loop the engine and the sampler run on (the producer runs it in its own thread).
    sample: `sample(index, version) -> Awaitable[(result, position)]`, batch `index` on weights `version`.
    max_staleness: K.
    first_index: the draw index of the next batch (the trainer's step on a resumed run).
    version: the policy version the engine holds now.
  """

  def __init__(
    self,
    loop: asyncio.AbstractEventLoop,
    sample: Callable[[int, int], Awaitable[tuple[Any, dict[str, Any]]]],
    *,
    max_staleness: int,
    first_index: int,
    version: int,
  ):
    self._loop, self._sample, self.max_staleness = loop, sample, max_staleness
    self._index, self._version = first_index, version
    self._started = first_index
    self._ready: queue.Queue[Produced | BaseException] = queue.Queue()
    self._admitted = asyncio.Event()
    self._task: asyncio.Task | None = None
    self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
    self.busy_s = 0.0
    self.started = time.perf_counter()
    self._thread.start()
    asyncio.run_coroutine_threadsafe(self._start(), loop).result()

  def _run(self) -> None:
    asyncio.set_event_loop(self._loop)
    self._loop.run_forever()

  async def _start(self) -> None:
    self._task = asyncio.ensure_future(self._produce())

  async def _produce(self) -> None:
    try:
      while True:
        while self._index > self._version + self.max_staleness:
          self._admitted.clear()
          await self._admitted.wait()
        index, version = self._index, self._version
        self._started = index + 1
        t0 = time.perf_counter()
        result, position = await self._sample(index, version)
        self.busy_s += time.perf_counter() - t0
        self._ready.put(Produced(index, version, result, position))
        self._index += 1
    except asyncio.CancelledError:
      raise
    except BaseException as error:  # noqa: BLE001  (the trainer re-raises it in its own thread)
      self._ready.put(error)

  def get(self) -> Produced:
    """The next sampled batch, in draw order (waits for it)."""
    item = self._ready.get()
    if isinstance(item, BaseException):
      raise RuntimeError("the rollout producer failed") from item
    return item

  def run(self, coroutine: Awaitable[Any]) -> Any:
    """Runs `coroutine` on the producer's loop from the trainer's thread and waits for its result."""
    return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

  def advance(self, version: int) -> None:
    """The trainer now holds `version` (and the engine has it): batches up to `version + K` may start."""

    def admit() -> None:
      self._version = version
      self._admitted.set()

    self._loop.call_soon_threadsafe(admit)

  @property
  def drawn(self) -> int:
    """Batches started (their prompts drawn), the one in flight included."""
    return self._started

  def busy_fraction(self) -> float:
    return self.busy_s / max(time.perf_counter() - self.started, 1e-9)

  def stop(self) -> None:
    """Cancels the batch in flight and stops the thread; the loop stays open for the trainer to close."""

    async def cancel() -> None:
      if self._task is not None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    if self._thread.is_alive():
      asyncio.run_coroutine_threadsafe(cancel(), self._loop).result()
      self._loop.call_soon_threadsafe(self._loop.stop)
      self._thread.join()
