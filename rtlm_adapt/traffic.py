"""TrafficLog: the recent requests a controller accepted, what it predicted for each, and how
each ended, so that the traffic can be served again in a simulation (a shadow replay).

The controller records into a log only when a policy asks for one
(:meth:`AdaptiveController.watch_traffic <rtlm_adapt.controller.AdaptiveController.watch_traffic>`):
the shadow guard of a learned policy (:mod:`rtlm_adapt.policies.shadow_guard`) replays it under
the learned policy and under the heuristic and compares the two.

A log keeps the last ``capacity`` requests. A request withdrawn while it waited (cancelled,
shed) leaves the log: it was never served, so a replay should not serve it either.

>>> from rtlm_adapt.arrival import ArrivalScore
>>> from rtlm_adapt.predictor import LengthPrediction
>>> from rtlm_adapt.request import Request
>>> log = TrafficLog(capacity=2)
>>> score = ArrivalScore({}, uncertainty=0.3, prediction=LengthPrediction(50.0, 20.0, 90.0),
...                      prompt_tokens=4)
>>> for i in range(3):
...     log.record_submit(Request(f"r{i}", "Hi.", float(i)), score)
>>> log.record_end("r2", output_tokens=70)
>>> [(r.request.id, r.output_tokens) for r in log.records()], log.accepted
([('r1', None), ('r2', 70)], 3)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from rtlm_adapt.arrival import ArrivalScore
from rtlm_adapt.request import Request


@dataclass(slots=True)
class TrafficRecord:
    """One accepted request: as submitted, as the controller scored it, and its outcome."""

    request: Request
    score: ArrivalScore
    #: Tokens it generated, once it ended (None while it is live).
    output_tokens: int | None = None


class TrafficLog:
    """The last ``capacity`` requests a controller accepted, in order of submission."""

    def __init__(self, capacity: int = 200) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"TrafficLog capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._records: OrderedDict[str, TrafficRecord] = OrderedDict()
        #: Requests accepted since the log began.
        self.accepted = 0

    def record_submit(self, request: Request, score: ArrivalScore) -> None:
        """A request was accepted with ``score``; the oldest record goes once ``capacity`` are
        kept."""
        self._records[request.id] = TrafficRecord(request, score)
        self.accepted += 1
        if len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def record_end(self, request_id: str, *, output_tokens: int) -> None:
        """A request that ran ended, after ``output_tokens`` tokens."""
        record = self._records.get(request_id)
        if record is not None:
            record.output_tokens = output_tokens

    def record_withdrawn(self, request_id: str) -> None:
        """A waiting request left without running (cancelled, shed): a replay skips it."""
        self._records.pop(request_id, None)

    def records(self) -> list[TrafficRecord]:
        """The kept records, oldest first."""
        return list(self._records.values())

    def clear(self) -> None:
        self._records.clear()
        self.accepted = 0

    def __len__(self) -> int:
        return len(self._records)
