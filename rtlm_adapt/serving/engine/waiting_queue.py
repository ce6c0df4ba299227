"""The engine's waiting queue: first come first served, or by (priority, arrival).

As vLLM's ``request_queue.py``: the policy is the choice of a data structure and a key. A
preempted request goes back to the front of a FCFS queue; in a priority queue there is no front,
it takes its (priority, arrival) place again.

>>> from rtlm_adapt.serving.engine.sequence import EngineSequence
>>> seqs = [EngineSequence(None, 4, 4, priority=p, order=i) for i, p in enumerate([5, 1, 5])]
>>> q = create_waiting_queue("priority")
>>> for s in seqs:
...     q.add(s)
>>> [q.pop().order for _ in range(len(q))]
[1, 0, 2]
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator

from rtlm_adapt.serving.engine.sequence import EngineSequence


class WaitingQueue(ABC):
    """Requests waiting to run, in the order the policy serves them."""

    @abstractmethod
    def add(self, seq: EngineSequence) -> None:
        """Queue a newly arrived request."""

    @abstractmethod
    def prepend(self, seq: EngineSequence) -> None:
        """Put back a preempted request (at the front, where the policy has one)."""

    @abstractmethod
    def peek(self) -> EngineSequence:
        """The request served next."""

    @abstractmethod
    def pop(self) -> EngineSequence:
        """Take the request served next."""

    @abstractmethod
    def remove(self, seq: EngineSequence) -> None:
        """Take out a request wherever it is (an abort)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[EngineSequence]: ...


class FCFSWaitingQueue(WaitingQueue):
    """Arrival order; preempted requests go to the front."""

    def __init__(self) -> None:
        self._items: deque[EngineSequence] = deque()

    def add(self, seq: EngineSequence) -> None:
        self._items.append(seq)

    def prepend(self, seq: EngineSequence) -> None:
        self._items.appendleft(seq)

    def peek(self) -> EngineSequence:
        return self._items[0]

    def pop(self) -> EngineSequence:
        return self._items.popleft()

    def remove(self, seq: EngineSequence) -> None:
        self._items.remove(seq)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[EngineSequence]:
        return iter(self._items)


class PriorityWaitingQueue(WaitingQueue):
    """A heap by (priority, arrival): lower priority values first."""

    def __init__(self) -> None:
        self._heap: list[EngineSequence] = []

    def add(self, seq: EngineSequence) -> None:
        heapq.heappush(self._heap, seq)

    def prepend(self, seq: EngineSequence) -> None:
        self.add(seq)  # no front in a priority queue: its rank places it

    def peek(self) -> EngineSequence:
        return self._heap[0]

    def pop(self) -> EngineSequence:
        return heapq.heappop(self._heap)

    def remove(self, seq: EngineSequence) -> None:
        self._heap.remove(seq)
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[EngineSequence]:
        return iter(sorted(self._heap))


def create_waiting_queue(policy: str) -> WaitingQueue:
    """The waiting queue of vLLM's ``--scheduling-policy`` ``policy``."""
    if policy == "fcfs":
        return FCFSWaitingQueue()
    if policy == "priority":
        return PriorityWaitingQueue()
    raise ValueError(f"unknown scheduling policy {policy!r}; expected 'fcfs' or 'priority'")
