"""LoopResult: what a serving loop did, the counts and (optionally) every ended request."""

from __future__ import annotations

from dataclasses import dataclass, field

from rtlm_adapt.request import Completion


@dataclass(slots=True)
class LoopResult:
    """What the loop did. ``completions`` holds every ended request (successes and failures)
    unless the loop was built with ``keep_completions=False``; the counters are always kept."""

    completions: list[Completion] = field(default_factory=list)
    submitted: int = 0
    rejected: int = 0
    end_time: float = 0.0
    completed: int = 0  # ended with a result
    failed: int = 0  # ended with an error (rejections included)
    faults: int = 0  # executor steps that raised, hung or returned garbage
    garbage: int = 0  # of which garbage (bad step fields or bad completions)
    retries: int = 0  # requests re-admitted after a fault
    dropped: int = 0  # completions ignored: unknown ids and duplicates

    def record(self, completion: Completion, *, keep: bool) -> None:
        """Count an ended request (and ``keep`` its Completion)."""
        if completion.error is None:
            self.completed += 1
        else:
            self.failed += 1
        if keep:
            self.completions.append(completion)
