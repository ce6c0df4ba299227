"""BatchPicker: which waiting requests an executor takes when it has room.

Best key first, except that a request which has waited ``max_wait_s`` (the hard aging bound)
goes before anyone on the primary; a secondary executor takes only requests flagged for
offloading. In static batching a batch is grouped around the best request from those closest
to it in predicted length, so short requests don't wait for a long one in the same batch.

The picker remembers a time before which no waiting request can reach the aging bound, so most
calls need not look at the oldest request at all.

>>> from rtlm_adapt.queue import QueueEntry, RequestQueue
>>> queue = RequestQueue()
>>> for name, arrival, key in [("old", 0.0, 9.0), ("short", 5.0, 1.0), ("mid", 6.0, 2.0)]:
...     queue.push(QueueEntry(request_id=name, arrival_time=arrival, key=key))
>>> picker = BatchPicker(queue)
>>> [e.request_id for e in picker.take(2, now=7.0, max_wait_s=10.0, offload_only=False)]
['short', 'mid']
>>> [e.request_id for e in picker.take(1, now=12.0, max_wait_s=10.0, offload_only=False)]
['old']
"""

from __future__ import annotations

import math

from rtlm_adapt.live_request import LiveRequest
from rtlm_adapt.queue import RequestQueue


class BatchPicker:
    """Takes requests out of ``queue`` for an executor (see the module docstring)."""

    def __init__(self, queue: RequestQueue) -> None:
        self.queue = queue
        # No waiting request reaches the hard aging bound before this time (a lower bound, reset
        # whenever it might be too late), so take() need not look at the oldest until then.
        self._aging_due = -math.inf

    def forget_aging_bound(self) -> None:
        """The bound may have moved (new knobs): look at the oldest request on the next take."""
        self._aging_due = -math.inf

    def note_arrival(self, arrival_time: float, max_wait_s: float) -> None:
        """A request arrived; one older than the remembered bound assumed resets it."""
        if arrival_time + max_wait_s < self._aging_due:
            self._aging_due = -math.inf

    def take(
        self, room: int, now: float, max_wait_s: float, *, offload_only: bool
    ) -> list[LiveRequest]:
        """Up to ``room`` requests, best key first, any past the aging bound before them."""
        taken: list[LiveRequest] = []
        queue = self.queue
        for _ in range(room):
            entry = None
            if max_wait_s < math.inf and not offload_only and now >= self._aging_due:
                oldest = queue.oldest()
                if oldest is not None:
                    if now - oldest.arrival_time >= max_wait_s:
                        entry = oldest
                        queue.remove(entry.request_id)
                    else:  # removals only make the oldest younger: no aged request before this
                        self._aging_due = oldest.arrival_time + max_wait_s
            if entry is None:
                entry = queue.pop(offload_only=offload_only)
            if entry is None:  # nothing (eligible) left
                break
            taken.append(entry)
        return taken

    def take_similar(
        self, room: int, now: float, max_wait_s: float, *, offload_only: bool
    ) -> list[LiveRequest]:
        """A static batch: the best request plus those closest to it in predicted length."""
        window = self.take(
            min(len(self.queue), room * 4), now, max_wait_s, offload_only=offload_only
        )
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
