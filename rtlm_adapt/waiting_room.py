"""WaitingRoom: the waiting requests, ordered under the knobs in force, and who goes next.

A request enters with a priority key from :meth:`Knobs.priority <rtlm_adapt.knobs.Knobs.priority>`
and a flag saying whether it may be offloaded. For fixed knobs the keys' order does not change
with time, so they stay in a heap (:class:`~rtlm_adapt.queue.RequestQueue`); new knobs re-key
the room once (O(n)), and a new offload threshold only re-flags it.

An executor with room takes the best keys, except that a request which has waited ``max_wait_s``
(the hard aging bound) goes before anyone on the primary; a secondary executor takes only
requests flagged for offloading. In static batching a batch is grouped around the best request
from those closest to it in predicted length, so short requests don't wait for a long one.

>>> from rtlm_adapt.queue import QueueEntry
>>> room = WaitingRoom(Knobs(max_wait_s=10.0))
>>> for name, arrival, key in [("old", 0.0, 9.0), ("short", 5.0, 1.0), ("mid", 6.0, 2.0)]:
...     room.queue.push(QueueEntry(request_id=name, arrival_time=arrival, key=key))
>>> [e.request_id for e in room.take(2, now=7.0, offload_only=False)]
['short', 'mid']
>>> [e.request_id for e in room.take(1, now=12.0, offload_only=False)]
['old']
"""

from __future__ import annotations

import math

from rtlm_adapt.knobs import Knobs
from rtlm_adapt.live_request import LiveRequest
from rtlm_adapt.queue import RequestQueue

#: The knobs that set the order of the keys (the others leave it alone).
_ORDER_KNOBS = ("length_weight", "uncertainty_weight", "wait_weight", "slack_weight")


class WaitingRoom:
    """The waiting requests under ``knobs`` (see the module docstring)."""

    def __init__(self, knobs: Knobs | None = None) -> None:
        self.queue = RequestQueue()
        self.knobs = knobs if knobs is not None else Knobs()
        # No waiting request reaches the hard aging bound before this time (a lower bound, reset
        # whenever it might be too late), so take() need not look at the oldest until then.
        self._aging_due = -math.inf

    def __len__(self) -> int:
        return len(self.queue)

    def admit(self, live: LiveRequest) -> None:
        """Queue ``live`` under the knobs in force."""
        live.key, live.offload = self.key_of(live)
        self.queue.push(live)
        if live.arrival_time + self.knobs.max_wait_s < self._aging_due:
            self._aging_due = -math.inf  # arrived out of order: older than the bound assumed

    def key_of(self, live: LiveRequest) -> tuple[float, bool]:
        """``live``'s priority key under the knobs in force, and whether it may be offloaded."""
        knobs, request = self.knobs, live.request
        key = knobs.priority(
            live.service_s, live.uncertainty, request.arrival_time, request.deadline
        )
        return key, live.offloadable(knobs.offload_threshold)

    def set_knobs(self, knobs: Knobs) -> None:
        """Apply new knobs: re-key (O(n)) only when the order changes, else only re-flag."""
        old, self.knobs = self.knobs, knobs
        self._aging_due = -math.inf  # max_wait_s may have changed
        if any(getattr(old, name) != getattr(knobs, name) for name in _ORDER_KNOBS):
            self.queue.rekey(self.key_of)
        elif old.offload_threshold != knobs.offload_threshold:
            threshold = knobs.offload_threshold
            self.queue.reflag(lambda live: live.offloadable(threshold))

    def take(self, room: int, now: float, *, offload_only: bool) -> list[LiveRequest]:
        """Up to ``room`` requests, best key first, any past the aging bound before them."""
        taken: list[LiveRequest] = []
        max_wait = self.knobs.max_wait_s
        queue = self.queue
        for _ in range(room):
            entry = None
            if max_wait < math.inf and not offload_only and now >= self._aging_due:
                oldest = queue.oldest()
                if oldest is not None:
                    if now - oldest.arrival_time >= max_wait:
                        entry = oldest
                        queue.remove(entry.request_id)
                    else:  # removals only make the oldest younger: no aged request before this
                        self._aging_due = oldest.arrival_time + max_wait
            if entry is None:
                entry = queue.pop(offload_only=offload_only)
            if entry is None:  # nothing (eligible) left
                break
            taken.append(entry)
        return taken

    def take_similar(self, room: int, now: float, *, offload_only: bool) -> list[LiveRequest]:
        """A static batch: the best request plus those closest to it in predicted length."""
        window = self.take(min(len(self.queue), room * 4), now, offload_only=offload_only)
        if not window:
            return []
        head, rest = window[0], window[1:]
        target = math.log1p(head.rank_length)
        rest.sort(key=lambda e: abs(math.log1p(e.rank_length) - target))
        chosen, back = [head, *rest[: room - 1]], rest[room - 1 :]
        for entry in back:  # put the others back (keys unchanged; the queue re-sequences them)
            self.queue.push(entry)
        self._aging_due = -math.inf
        return chosen

    def work_ahead(self, request_id: str) -> float:
        """Predicted service seconds of the waiting requests that would go before this one
        (smaller keys; 0 if it is not waiting). O(queue length)."""
        me = self.queue.get(request_id)
        if me is None:
            return 0.0
        return sum(live.service_s for live in self.queue if live.key < me.key)
