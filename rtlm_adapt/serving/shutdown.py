"""Shutdown without draining: every accepted request ends with a ``shutdown`` failure, at once.

``ServingLoop.shutdown(drain=False)`` refuses the arrivals not yet submitted itself (the closed
controller refuses each one), then hands the rest to :func:`fail_accepted`: the requests still
queued in the controller, those waiting for a retry, and those on an executor (aborted there,
unless a hung call still holds the executor). Each lane is left idle, with no step pending.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from rtlm_adapt.request import Completion, FailureReason
from rtlm_adapt.serving.lane import Lane
from rtlm_adapt.serving.retries import Abort

DETAIL = "loop shut down"


def fail_accepted(
    controller,
    lanes: Sequence[Lane],
    now: float,
    *,
    abort: Abort,
    end: Callable[[Completion], None],
    emit: Callable[[Completion], None],
) -> None:
    """End every request ``controller`` accepted with a ``shutdown`` failure at ``now``.

    ``end`` reports a request the controller holds as running, ``emit`` one it no longer holds
    (``fail_queued`` has already counted the queued ones)."""
    shutdown = FailureReason.SHUTDOWN
    for request in controller.fail_queued(shutdown):
        emit(Completion.failed(request, shutdown, DETAIL, now))
    for lane in lanes:
        lane.pending, lane.busy_until, lane.fault = None, math.inf, None
        while lane.retry:
            end(Completion.failed(lane.retry.popleft(), shutdown, DETAIL, now))
        for rid in list(lane.inflight):
            request = lane.inflight.pop(rid)
            if lane.stuck is None:
                abort(lane, rid, now)
            end(Completion.failed(request, shutdown, DETAIL, now, lane.executor.name))
