"""TrafficLog: the recent requests a controller accepted, what it predicted for each, and how
each ended, so that the traffic can be served again in a simulation (a shadow replay).

The controller records into a log only when a policy asks for one
(:meth:`AdaptiveController.watch_traffic <rtlm_adapt.controller.AdaptiveController.watch_traffic>`):
the shadow guard of a learned policy (:mod:`rtlm_adapt.policies.shadow_guard`) replays it under
the learned policy and under the heuristic and compares the two.

A log keeps the last ``capacity`` requests: its *window*, which opens when the oldest of them
arrived. A replay must start from the state the live system was in then, not from an empty one:
a policy that fails only once a backlog has built (its own slow answers make it choose worse
knobs) looks fine from an empty start. So the log also keeps

- the *backlog*: older requests that were still waiting or running when the window opened;
- the controller's smoothed signals as each request arrived, so a replay starts from those the
  policy saw when the window opened.

A request withdrawn while it waited (cancelled, shed) leaves the log: it was never served, so a
replay should not serve it either.

>>> from rtlm_adapt.arrival import ArrivalScore
>>> from rtlm_adapt.predictor import LengthPrediction
>>> from rtlm_adapt.request import Request
>>> log = TrafficLog(capacity=2)
>>> score = ArrivalScore({}, uncertainty=0.3, prediction=LengthPrediction(50.0, 20.0, 90.0),
...                      prompt_tokens=4)
>>> for i in range(4):
...     log.record_submit(Request(f"r{i}", "Hi.", float(i)), score)
>>> log.record_end("r1", output_tokens=70, finished_at=1.5)  # before the window opened at 2.0
>>> window = log.window()
>>> window.start, [r.request.id for r in window.backlog], [r.request.id for r in window.records]
(2.0, ['r0'], ['r0', 'r2', 'r3'])
>>> log.accepted
4
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from rtlm_adapt.arrival import ArrivalScore
from rtlm_adapt.request import Request
from rtlm_adapt.signals import ServingSignals


@dataclass(slots=True)
class TrafficRecord:
    """One accepted request: as submitted, as the controller scored it, and its outcome."""

    request: Request
    score: ArrivalScore
    #: Tokens it generated, once it ended (None while it is live).
    output_tokens: int | None = None
    #: When it ended (None while it is live).
    finished_at: float | None = None
    #: The controller's smoothed signals just before it arrived (None if not recorded).
    signals: ServingSignals | None = None

    def live_at(self, t: float) -> bool:
        """Whether it had arrived and not yet ended at time ``t``."""
        return self.request.arrival_time <= t and (self.finished_at is None
                                                   or self.finished_at > t)


@dataclass(frozen=True, slots=True)
class TrafficWindow:
    """What a replay serves: the records of a stretch of traffic that opened at ``start``,
    with those that were still live then (the backlog, arrived before ``start``) first, and
    the controller's smoothed ``signals`` when it opened (None: fresh ones)."""

    start: float
    records: tuple[TrafficRecord, ...]
    signals: ServingSignals | None = None

    @classmethod
    def of(cls, records: Sequence[TrafficRecord]) -> TrafficWindow:
        """``records`` (oldest first) as a window that opens when the first arrived, with no
        backlog and the signals recorded with the first."""
        if not records:
            raise ValueError("a traffic window needs at least one record")
        first = records[0]
        return cls(first.request.arrival_time, tuple(records), first.signals)

    @property
    def backlog(self) -> list[TrafficRecord]:
        """The records that arrived before the window opened and were still live then."""
        return [r for r in self.records if r.request.arrival_time < self.start]


class TrafficLog:
    """The last ``capacity`` requests a controller accepted, in order of submission, and the
    older ones still live when the oldest of those arrived (see the module docstring)."""

    def __init__(self, capacity: int = 200) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"TrafficLog capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._records: OrderedDict[str, TrafficRecord] = OrderedDict()  # the window
        self._backlog: OrderedDict[str, TrafficRecord] = OrderedDict()  # older, maybe live
        #: Requests accepted since the log began.
        self.accepted = 0

    def record_submit(
        self, request: Request, score: ArrivalScore, signals: ServingSignals | None = None
    ) -> None:
        """A request was accepted with ``score``, when the controller's smoothed signals were
        ``signals`` (copied); the oldest record leaves the window once ``capacity`` are kept."""
        snapshot = signals.snapshot() if signals is not None else None
        self._records[request.id] = TrafficRecord(request, score, signals=snapshot)
        self.accepted += 1
        if len(self._records) > self.capacity:
            rid, oldest = self._records.popitem(last=False)
            opens = next(iter(self._records.values())).request.arrival_time
            if oldest.live_at(opens):  # still live when the window now opens: backlog
                self._backlog[rid] = oldest

    def record_end(self, request_id: str, *, output_tokens: int, finished_at: float) -> None:
        """A request that ran ended at ``finished_at``, after ``output_tokens`` tokens."""
        record = self._records.get(request_id) or self._backlog.get(request_id)
        if record is not None:
            record.output_tokens = output_tokens
            record.finished_at = finished_at

    def record_withdrawn(self, request_id: str) -> None:
        """A waiting request left without running (cancelled, shed): a replay skips it."""
        self._records.pop(request_id, None)
        self._backlog.pop(request_id, None)

    def window(self) -> TrafficWindow:
        """The window as it stands, backlog first, as copies a replay may keep (raises
        ValueError while the log is empty)."""
        if not self._records:
            raise ValueError("the traffic log is empty: there is no window to replay")
        first = next(iter(self._records.values()))
        start = first.request.arrival_time
        # a backlog request that ended before the window opened is of no use any more
        for rid in [rid for rid, r in self._backlog.items() if not r.live_at(start)]:
            del self._backlog[rid]
        records = [*self._backlog.values(), *self._records.values()]
        return TrafficWindow(start, tuple(replace(r) for r in records), first.signals)

    def records(self) -> list[TrafficRecord]:
        """The window's records, oldest first (without the backlog)."""
        return list(self._records.values())

    def clear(self) -> None:
        self._records.clear()
        self._backlog.clear()
        self.accepted = 0

    def __len__(self) -> int:
        """Records kept, the backlog's included."""
        return len(self._records) + len(self._backlog)
