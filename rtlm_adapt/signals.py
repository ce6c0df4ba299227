"""ServingSignals: the smoothed figures a policy's observation reports about recent serving.

Each is an exponentially weighted moving average, updated as requests arrive, steps run and
requests finish; all are part of the controller's checkpoint.

>>> signals = ServingSignals()
>>> signals.record_arrival_rate(arrivals=10, elapsed_s=2.0, first=True)
>>> signals.record_arrival_rate(arrivals=0, elapsed_s=1.0, first=False)
>>> round(signals.arrival_rate, 3)
3.5
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(slots=True)
class ServingSignals:
    #: Requests per second, smoothed over scheduling epochs.
    arrival_rate: float = 0.0
    #: Isolated service time of a request on the primary, as predicted at submit (s).
    service_ewma: float = 0.0
    #: Response time of finished requests (s).
    response_ewma: float = 0.0
    #: Share of finished requests that missed their deadline.
    miss_ewma: float = 0.0
    #: Duration of one decode iteration on the primary (s).
    step_ewma: float = 0.0

    def record_arrival_rate(self, arrivals: int, elapsed_s: float, *, first: bool) -> None:
        """An epoch of ``elapsed_s`` seconds saw ``arrivals`` submits."""
        rate = arrivals / elapsed_s
        self.arrival_rate = rate if first else 0.7 * self.arrival_rate + 0.3 * rate

    def record_service(self, isolated_s: float, *, first: bool) -> None:
        """A request was submitted whose isolated service time is predicted as ``isolated_s``."""
        if first:
            self.service_ewma = isolated_s
        else:
            self.service_ewma += 0.05 * (isolated_s - self.service_ewma)

    def record_finish(self, response_s: float, missed_deadline: bool) -> None:
        """A request finished with a result."""
        if 0.0 <= response_s < math.inf:
            self.response_ewma += 0.05 * (response_s - self.response_ewma)
        self.miss_ewma += 0.05 * (missed_deadline - self.miss_ewma)

    def record_step(self, per_iteration_s: float) -> None:
        """The primary ran decode iterations of ``per_iteration_s`` seconds each."""
        if math.isfinite(per_iteration_s) and per_iteration_s >= 0:
            self.step_ewma += 0.1 * (per_iteration_s - self.step_ewma)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
