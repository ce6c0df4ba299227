"""Cancellations: a request the client gave up on ends with a ``cancelled`` failure, once.

A queued request is the controller's alone: it hands the request back and it ends at once. A
running one is only marked by the controller (``take_cancellations`` collects the marks); the
loop applies the marks when it next handles events: the request comes off its lane (its retry
queue, or its executor through an abort) and ends. A step left serving nobody is given up, so the
executor is free at once rather than when the step would have ended.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from rtlm_adapt.request import Completion, FailureReason, Request
from rtlm_adapt.serving.lane import Lane
from rtlm_adapt.serving.retries import Abort, Retries


class Cancellations:
    """Ends cancelled requests, queued or running, on behalf of a serving loop.

    Parameters
    ----------
    controller
        The loop's controller: ``cancel``, ``is_running`` and ``take_cancellations`` where it
        has them (a controller without ``take_cancellations`` never cancels a running request).
    lanes
        The loop's lanes (shared).
    retries
        Forgets the retry count of a request that ends here.
    abort
        Takes a request off its executor.
    end, emit
        End a request the controller holds as running / one it no longer holds.
    """

    def __init__(
        self,
        controller,
        lanes: Sequence[Lane],
        retries: Retries,
        *,
        abort: Abort,
        end: Callable[[Completion], None],
        emit: Callable[[Completion], None],
    ) -> None:
        self.controller = controller
        self.lanes = lanes
        self._retries = retries
        self._abort = abort
        self._end = end
        self._emit = emit
        self._take_marks = getattr(controller, "take_cancellations", None)

    def cancel(self, request_id: str, now: float) -> bool:
        """Cancel a queued or running request; False if it is not live in the controller.

        A queued request ends at once; a running one when :meth:`apply` next runs."""
        request = self.controller.cancel(request_id)
        if request is not None:
            self._emit(
                Completion.failed(request, FailureReason.CANCELLED, "cancelled while queued", now)
            )
            return True
        is_running = getattr(self.controller, "is_running", None)
        return bool(is_running and is_running(request_id))

    def apply(self, now: float) -> None:
        """End every running request the controller marked as cancelled since the last call."""
        if self._take_marks is None:
            return
        for rid in self._take_marks():
            for lane in self.lanes:
                request = self._take_off(lane, rid, now)
                if request is not None:
                    self._cancelled(lane, request, now)
                    break

    def _take_off(self, lane: Lane, rid: str, now: float) -> Request | None:
        """The request, taken off ``lane`` (its executor or its retry queue); None if not there."""
        request = lane.inflight.pop(rid, None)
        if request is not None:
            if lane.stuck is None:  # a hung call still holds the executor: leave it alone
                self._abort(lane, rid, now)
            return request
        request = next((r for r in lane.retry if r.id == rid), None)
        if request is not None:
            lane.retry.remove(request)
        return request

    def _cancelled(self, lane: Lane, request: Request, now: float) -> None:
        self._retries.forget(request.id)
        self._end(
            Completion.failed(
                request,
                FailureReason.CANCELLED,
                "cancelled while running",
                now,
                lane.executor.name,
            )
        )
        if not lane.inflight and lane.pending is not None and lane.fault is None:
            # the step now serves nobody: free the executor instead of waiting it out
            lane.pending, lane.busy_until = None, math.inf
