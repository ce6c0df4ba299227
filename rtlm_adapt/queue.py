"""RequestQueue: the waiting requests, ordered by a time-invariant priority key.

Two heaps share the same entries: one over every waiting request, one over those eligible for
offloading. Removal is lazy (an entry is marked dead and skipped when it reaches the top), so
taking a request from either heap is O(log n) and the other heap never needs a search. A heap
item is ``(key, seq, entry)``; it is live only while the entry is alive and still carries that
``seq``, so an entry taken out and pushed again is never served from a stale item. A third
heap, by arrival time, serves the hard aging bound: the oldest waiting request in O(log n), even
when requests are put back out of order.

Keys only change when the knobs do; ``rekey`` then rebuilds both heaps in O(n).

>>> q = RequestQueue()
>>> for name, key in [("a", 3.0), ("b", 1.0), ("c", 2.0)]:
...     q.push(QueueEntry(request_id=name, arrival_time=0.0, key=key))
>>> [q.pop().request_id for _ in range(len(q))]
['b', 'c', 'a']
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, eq=False)
class QueueEntry:
    """One waiting request: its id, arrival time, priority key and offload flag.

    ``payload`` carries anything the caller wants; a subclass may instead add its own fields
    (the controller's per-request record is a QueueEntry).
    """

    request_id: str
    arrival_time: float
    key: float = 0.0
    offload: bool = False
    payload: Any = None
    alive: bool = True
    seq: int = field(default=0)


class RequestQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, QueueEntry]] = []
        self._offload_heap: list[tuple[float, int, QueueEntry]] = []
        self._by_arrival: list[tuple[float, int, QueueEntry]] = []
        self._entries: dict[str, QueueEntry] = {}
        self._counter = itertools.count()
        self._removed = 0  # removals since the last compaction check

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def __iter__(self) -> Iterator[QueueEntry]:
        """Live entries, in no particular order."""
        return iter(list(self._entries.values()))

    def get(self, request_id: str) -> QueueEntry | None:
        return self._entries.get(request_id)

    def push(self, entry: QueueEntry) -> None:
        """Add a waiting request."""
        if entry.request_id in self._entries:
            raise ValueError(f"request id {entry.request_id!r} is already queued")
        entry.seq = next(self._counter)
        entry.alive = True
        self._entries[entry.request_id] = entry
        heapq.heappush(self._heap, (entry.key, entry.seq, entry))
        if entry.offload:
            heapq.heappush(self._offload_heap, (entry.key, entry.seq, entry))
        heapq.heappush(self._by_arrival, (entry.arrival_time, entry.seq, entry))

    def peek(self, *, offload_only: bool = False) -> QueueEntry | None:
        """The best waiting entry (optionally among offload-eligible ones), without removing it."""
        return _first_live(self._offload_heap if offload_only else self._heap)

    def pop(self, *, offload_only: bool = False) -> QueueEntry | None:
        """Remove and return the best waiting entry."""
        heap = self._offload_heap if offload_only else self._heap
        while heap:
            _, seq, entry = heapq.heappop(heap)
            if entry.alive and entry.seq == seq:
                del self._entries[entry.request_id]
                entry.alive = False
                self._count_removal()
                return entry
        return None

    def oldest(self) -> QueueEntry | None:
        """The longest-waiting live entry (by arrival time, then submission order)."""
        return _first_live(self._by_arrival)

    def remove(self, request_id: str) -> QueueEntry | None:
        """Take a request out of the queue (lazily: heaps skip it later)."""
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            entry.alive = False
            self._count_removal()
        return entry

    def rekey(self, key_of: Callable[[QueueEntry], tuple[float, bool]]) -> None:
        """Recompute every live entry's (key, offload) and rebuild the heaps."""
        heap, offload = [], []
        for entry in self._entries.values():
            entry.key, entry.offload = key_of(entry)
            heap.append((entry.key, entry.seq, entry))
            if entry.offload:
                offload.append((entry.key, entry.seq, entry))
        heapq.heapify(heap)
        heapq.heapify(offload)
        self._heap, self._offload_heap = heap, offload

    def reflag(self, flag_of: Callable[[QueueEntry], bool]) -> None:
        """Recompute every live entry's offload flag (keys unchanged); rebuild the offload heap."""
        offload = []
        for entry in self._entries.values():
            entry.offload = flag_of(entry)
            if entry.offload:
                offload.append((entry.key, entry.seq, entry))
        heapq.heapify(offload)
        self._offload_heap = offload

    def sample(self, n: int) -> list[QueueEntry]:
        """Up to ``n`` live entries (the longest-queued first: dicts keep insertion order)."""
        return list(itertools.islice(self._entries.values(), n))

    def _count_removal(self) -> None:
        # Dead items deep in a heap are never popped: every 64 removals (pop and remove are on
        # the hot path), rebuild any heap they dominate.
        self._removed += 1
        if self._removed >= 64:
            self._removed = 0
            self._maybe_compact()

    def _maybe_compact(self) -> None:
        live = len(self._entries)
        for name in ("_heap", "_offload_heap", "_by_arrival"):
            heap = getattr(self, name)
            if len(heap) > 64 and len(heap) > 4 * live:
                heap = [t for t in heap if t[2].alive and t[2].seq == t[1]]
                heapq.heapify(heap)
                setattr(self, name, heap)


def _first_live(heap: list[tuple[float, int, QueueEntry]]) -> QueueEntry | None:
    """The entry of the heap's first live item, popping the dead items above it."""
    while heap:
        _, seq, entry = heap[0]
        if entry.alive and entry.seq == seq:
            return entry
        heapq.heappop(heap)
    return None
