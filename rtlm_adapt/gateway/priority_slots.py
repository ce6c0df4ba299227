"""PrioritySlots: at most K holders at once; the waiters are served lowest priority first.

The slot discipline of an engine under vLLM's ``--scheduling-policy priority``, for the stand-in
engines of the tests and benchmarks (the paced backend, the Ray paced engine): a holder keeps its
slot for the ``async with``; a freed slot passes straight to the best waiter, by (priority, then
a sequence number the caller gives, usually arrival order). A waiter cancelled while queued leaves
the queue; one cancelled just as a slot reached it passes the slot on.

>>> import asyncio
>>> async def demo():
...     slots, order = PrioritySlots(1), []
...     async def use(name, priority, seq):
...         async with slots.hold(priority, seq):
...             order.append(name)
...             await asyncio.sleep(0.01)
...     await asyncio.gather(use("first", 9, 0), use("low", 5, 1), use("high", 1, 2))
...     return order
>>> asyncio.run(demo())
['first', 'high', 'low']
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class PrioritySlots:
    """At most ``limit`` holders at once (None: no limit); lowest (priority, seq) waiter first."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.running = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def hold(self, priority: int, seq: int) -> AsyncIterator[None]:
        """Hold a slot for the ``async with`` block (waiting for one first if all are taken)."""
        await self._acquire(priority, seq)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: int, seq: int) -> None:
        if self.limit is None or (self.running < self.limit and not self._waiters):
            self.running += 1
            return
        entry = (priority, seq, asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiters, entry)
        try:
            await entry[2]  # _release hands its slot over by resolving this future
        except asyncio.CancelledError:
            if entry[2].cancelled():
                if entry in self._waiters:  # an aborted waiter leaves the queue
                    self._waiters.remove(entry)
                    heapq.heapify(self._waiters)
            else:
                self._release()  # the slot arrived just as we were cancelled: pass it on
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = heapq.heappop(self._waiters)[2]
            if not waiter.done():  # skip one cancelled but not yet out of the queue
                waiter.set_result(None)  # the slot passes on: `running` is unchanged
                return
        self.running -= 1
