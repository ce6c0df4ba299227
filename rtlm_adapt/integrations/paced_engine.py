"""An engine-like stand-in for routing experiments: K slots, a priority queue, paced tokens.

Not a model. A request holds one of ``slots`` slots for ``ttft_s + max_tokens / tokens_per_s``
seconds and "generates" exactly ``max_tokens`` tokens; requests beyond the slots wait, lowest
``priority`` first (then arrival), as in vLLM's ``--scheduling-policy priority``. It tracks the
predicted tokens it holds and its measured speed, which the replica publishes to the router
(``record_routing_stats``).

>>> import asyncio
>>> engine = PacedEngine(slots=1, tokens_per_s=1000.0)
>>> async def two():
...     return await asyncio.gather(
...         engine.generate(40, priority=5, predicted_tokens=40.0),
...         engine.generate(10, priority=1, predicted_tokens=10.0),
...     )
>>> [r.output_tokens for r in asyncio.run(two())]
[40, 10]
>>> engine.stats()["outstanding_tokens"], engine.completed
(0.0, 2)
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineResult:
    """One generated answer, as the engine saw it (``time.monotonic()`` of its process)."""

    output_tokens: int
    queued_s: float
    service_s: float


class PacedEngine:
    """``slots`` concurrent generations at ``tokens_per_s`` each; the rest wait by priority."""

    def __init__(self, slots: int = 4, tokens_per_s: float = 200.0, ttft_s: float = 0.0) -> None:
        if slots < 1 or tokens_per_s <= 0 or ttft_s < 0:
            raise ValueError("need slots >= 1, tokens_per_s > 0 and ttft_s >= 0")
        self.slots = slots
        self.tokens_per_s = tokens_per_s
        self.ttft_s = ttft_s
        self.running = 0
        self.completed = 0
        self.outstanding_tokens = 0.0  # predicted tokens of the requests held here
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def generate(
        self, max_tokens: int, *, priority: int = 0, predicted_tokens: float = 0.0
    ) -> EngineResult:
        """Wait for a slot (lowest priority first), then pace ``max_tokens`` tokens."""
        arrived = time.monotonic()
        self.outstanding_tokens += predicted_tokens
        try:
            await self._acquire(priority)
            started = time.monotonic()
            try:
                await asyncio.sleep(self.ttft_s + max_tokens / self.tokens_per_s)
            finally:
                self._release()
        finally:
            self.outstanding_tokens = max(0.0, self.outstanding_tokens - predicted_tokens)
        self.completed += 1
        return EngineResult(int(max_tokens), started - arrived, time.monotonic() - started)

    def stats(self) -> dict[str, float]:
        """What the router reads: predicted backlog and capacity (tokens/s over all slots)."""
        return {
            "outstanding_tokens": self.outstanding_tokens,
            "tokens_per_s": self.tokens_per_s * self.slots,
            "running": float(self.running),
            "waiting": float(len(self._waiters)),
        }

    async def _acquire(self, priority: int) -> None:
        if self.running < self.slots and not self._waiters:
            self.running += 1
            return
        waiter = (priority, next(self._seq), asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiters, waiter)
        try:
            await waiter[2]  # _release hands its slot over by resolving this future
        except asyncio.CancelledError:
            if waiter[2].cancelled():
                self._waiters.remove(waiter)
                heapq.heapify(self._waiters)
            else:
                self._release()  # the slot came just as we were cancelled: pass it on
            raise

    def _release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)  # the slot passes over; running stays the same
                return
        self.running -= 1


__all__ = ["EngineResult", "PacedEngine"]
