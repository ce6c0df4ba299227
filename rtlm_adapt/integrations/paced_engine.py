"""An engine-like stand-in for routing experiments: K slots, a priority queue, paced tokens.

Not a model. A request holds one of ``slots`` slots for ``ttft_s + max_tokens / tokens_per_s``
seconds and "generates" exactly ``max_tokens`` tokens; requests beyond the slots wait, lowest
``priority`` first (then arrival), as in vLLM's ``--scheduling-policy priority``. It tracks the
predicted tokens it holds and its measured speed, which the replica publishes to the router
(``record_routing_stats``).

``queue_order="fcfs"`` serves the queue in arrival order instead and ignores ``priority``, as
vLLM's default ``--scheduling-policy fcfs`` accepts a priority and ignores it: the engine a
Serve user runs today, for comparison with the key-ordered one.

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
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

from rtlm_adapt.gateway.priority_slots import PrioritySlots


@dataclass(frozen=True, slots=True)
class EngineResult:
    """One generated answer, as the engine saw it (``time.monotonic()`` of its process)."""

    output_tokens: int
    queued_s: float
    service_s: float


#: How a replica orders its waiting requests: by ``priority`` (vLLM's ``priority`` policy) or
#: by arrival alone (vLLM's default ``fcfs``).
QUEUE_ORDERS = ("priority", "fcfs")


class PacedEngine:
    """``slots`` concurrent generations at ``tokens_per_s`` each; the rest wait by priority
    (``queue_order="priority"``) or in arrival order (``"fcfs"``)."""

    def __init__(
        self,
        slots: int = 4,
        tokens_per_s: float = 200.0,
        ttft_s: float = 0.0,
        queue_order: str = "priority",
    ) -> None:
        if slots < 1 or tokens_per_s <= 0 or ttft_s < 0:
            raise ValueError("need slots >= 1, tokens_per_s > 0 and ttft_s >= 0")
        if queue_order not in QUEUE_ORDERS:
            raise ValueError(f"queue_order must be one of {QUEUE_ORDERS}, got {queue_order!r}")
        self.slots = slots
        self.tokens_per_s = tokens_per_s
        self.ttft_s = ttft_s
        self.queue_order = queue_order
        self.completed = 0
        self.outstanding_tokens = 0.0  # predicted tokens of the requests held here
        self._slots = PrioritySlots(slots)
        self._seq = itertools.count()  # arrival order breaks priority ties

    async def generate(
        self, max_tokens: int, *, priority: int = 0, predicted_tokens: float = 0.0
    ) -> EngineResult:
        """Wait for a slot (lowest priority first, or first come under ``fcfs``), then pace
        ``max_tokens`` tokens."""
        arrived = time.monotonic()
        self.outstanding_tokens += predicted_tokens
        # Under fcfs every request has the same rank, so the arrival number alone orders them.
        rank = priority if self.queue_order == "priority" else 0
        try:
            async with self._slots.hold(rank, next(self._seq)):
                started = time.monotonic()
                await asyncio.sleep(self.ttft_s + max_tokens / self.tokens_per_s)
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
            "waiting": float(self._slots.waiting),
        }

    @property
    def running(self) -> int:
        """Requests holding a slot now."""
        return self._slots.running


def speed_for_rank(tokens_per_s: float, speed_factors: Sequence[float], rank: int) -> float:
    """One replica's tokens/s per slot in a deployment of unequal replicas: ``tokens_per_s``
    times ``speed_factors[rank]`` (1 for ranks beyond the list, so ``()`` means all equal)."""
    factor = float(speed_factors[rank]) if 0 <= rank < len(speed_factors) else 1.0
    if factor <= 0:
        raise ValueError(f"speed factors must be > 0, got {factor} for rank {rank}")
    return tokens_per_s * factor


__all__ = ["QUEUE_ORDERS", "EngineResult", "PacedEngine", "speed_for_rank"]
