"""RunningRequests: the requests a controller handed to executors that have not ended yet, and
the cancellations of those the serving loop has still to carry out.

A running request cannot be taken back by the controller itself: the executor holds it. So a
cancel only marks it, the loop collects the marks (:meth:`RunningRequests.take_cancellations`),
aborts each request on its executor and reports it ended, which clears the mark.

>>> from rtlm_adapt.live_request import LiveRequest
>>> from rtlm_adapt.predictor import LengthPrediction
>>> from rtlm_adapt.request import Request
>>> running = RunningRequests()
>>> live = LiveRequest("a", 0.0, request=Request("a", "Hi.", 0.0), features={}, uncertainty=0.2,
...                    prediction=LengthPrediction(10.0, 5.0, 20.0), prompt_tokens=2,
...                    rank_length=10.0, service_s=0.4)
>>> running.start(live, executor="gpu")
>>> running.mark_cancelled("a"), running.mark_cancelled("unknown")
(True, False)
>>> running.take_cancellations(), running.take_cancellations()
(['a'], [])
>>> running.end("a") is live, "a" in running
(True, False)
"""

from __future__ import annotations

from collections.abc import Iterator

from rtlm_adapt.live_request import LiveRequest


class RunningRequests:
    """The live requests on executors, by id, and their cancellation marks."""

    def __init__(self) -> None:
        self._live: dict[str, LiveRequest] = {}
        self._cancel_marks: set[str] = set()

    def start(self, live: LiveRequest, executor: str) -> None:
        """``live`` joined ``executor``."""
        live.executor = executor
        self._live[live.request_id] = live

    def end(self, request_id: str) -> LiveRequest | None:
        """The request ended: it leaves, with its mark; None if it was not running."""
        self._cancel_marks.discard(request_id)
        return self._live.pop(request_id, None)

    def get(self, request_id: str) -> LiveRequest | None:
        return self._live.get(request_id)

    def mark_cancelled(self, request_id: str) -> bool:
        """Mark a running request for the loop to abort; False if it is not running."""
        if request_id not in self._live:
            return False
        self._cancel_marks.add(request_id)
        return True

    def take_cancellations(self) -> list[str]:
        """The requests marked since the last call that are still running."""
        marks = [rid for rid in self._cancel_marks if rid in self._live]
        self._cancel_marks.clear()
        return marks

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._live

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[LiveRequest]:
        return iter(self._live.values())
