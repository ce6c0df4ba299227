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
import itertools
import time
from dataclasses import dataclass

from rtlm_adapt.gateway.priority_slots import PrioritySlots


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
        self.completed = 0
        self.outstanding_tokens = 0.0  # predicted tokens of the requests held here
        self._slots = PrioritySlots(slots)
        self._seq = itertools.count()  # arrival order breaks priority ties

    async def generate(
        self, max_tokens: int, *, priority: int = 0, predicted_tokens: float = 0.0
    ) -> EngineResult:
        """Wait for a slot (lowest priority first), then pace ``max_tokens`` tokens."""
        arrived = time.monotonic()
        self.outstanding_tokens += predicted_tokens
        try:
            async with self._slots.hold(priority, next(self._seq)):
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


__all__ = ["EngineResult", "PacedEngine"]
