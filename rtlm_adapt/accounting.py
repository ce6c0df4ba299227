"""The controller's accounting: every submitted request ends once, as finished or failed.

>>> counts = RequestCounts(submitted=3, finished=1)
>>> counts.count_failure(FailureReason.REJECTED)
>>> counts.failed, counts.failures["rejected"]
(1, 1)
>>> ControllerStats(submitted=3, queued=1, running=0, finished=1, failed=1,
...                 failures=counts.failures).balanced
True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rtlm_adapt.request import FAILURE_REASONS, FailureReason


@dataclass(slots=True)
class RequestCounts:
    """How many requests were submitted, finished and failed (per reason) so far."""

    submitted: int = 0
    finished: int = 0
    #: Failures per reason value; every reason is present (0 when none).
    failures: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.failures = {r.value: int(self.failures.get(r.value, 0)) for r in FAILURE_REASONS}

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def count_failure(self, reason: FailureReason, *, submitted: bool = False) -> None:
        """One more failed request; ``submitted``: one refused at submit (counted there too)."""
        if submitted:
            self.submitted += 1
        self.failures[reason.value] += 1

    def stats(self, *, queued: int, running: int) -> ControllerStats:
        """These counts with the requests now queued and running."""
        return ControllerStats(
            submitted=self.submitted,
            queued=queued,
            running=running,
            finished=self.finished,
            failed=self.failed,
            failures=dict(self.failures),
        )


@dataclass(frozen=True, slots=True)
class ControllerStats:
    submitted: int
    queued: int
    running: int
    finished: int
    failed: int
    #: Failures per reason (:data:`~rtlm_adapt.request.FAILURE_REASONS`); they sum to ``failed``.
    failures: Mapping[str, int] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        """Every submitted request is queued, running, finished or failed: nothing lost."""
        return (
            self.submitted == self.queued + self.running + self.finished + self.failed
            and sum(self.failures.values()) == self.failed
        )
