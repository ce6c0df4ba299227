"""Retries: what happens to the requests of a step that faulted.

A fault (a step that raised, hung or returned garbage, or a request the executor lost) takes the
requests it hit off their lane. Each is retried on the other lane (on the same one when there is
no other, or none that is in service) until it has used ``max_retries`` retries; then it ends
with the fault's reason and detail. Retry counts are kept only for requests that faulted, and
forgotten when a request ends any other way.

>>> from rtlm_adapt.calibration.step_cost import StepCost
>>> from rtlm_adapt.request import Request
>>> from rtlm_adapt.serving.lane import Lane
>>> from rtlm_adapt.serving.loop_result import LoopResult
>>> from rtlm_adapt.serving.sim import SimulatedExecutor
>>> lane = Lane(SimulatedExecutor("gpu", StepCost.default()), "primary")
>>> lane.inflight["a"] = Request("a", "hi", 0.0)
>>> ended = []
>>> retries = Retries([lane], 1, LoopResult(), abort=lambda *_: None, end=ended.append)
>>> retries.fault(lane, ["a"], FailureReason.EXECUTOR_FAILURE, "boom", now=1.0)
>>> [r.id for r in lane.retry], ended
(['a'], [])
>>> lane.inflight["a"] = lane.retry.popleft()  # the retry runs, and faults again
>>> retries.fault(lane, ["a"], FailureReason.EXECUTOR_FAILURE, "boom", now=2.0)
>>> [(c.request_id, c.error) for c in ended]
[('a', 'executor_failure: boom')]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from rtlm_adapt.request import Completion, FailureReason
from rtlm_adapt.serving.lane import Lane
from rtlm_adapt.serving.loop_result import LoopResult

logger = logging.getLogger(__name__)

#: ``abort(lane, request_id, now)``: take a request off its executor, whatever the executor says
Abort = Callable[[Lane, str, float], None]


class Retries:
    """Retry requests hit by an executor fault on another lane, or end them once retries run out.

    Parameters
    ----------
    lanes
        The loop's lanes (shared: the loop and its other parts see the same ones).
    max_retries
        How many times one request may be retried before it fails.
    result
        The loop's counters: ``faults`` and ``retries`` are counted here.
    abort
        Takes a request off its executor (the loop's, so a wall-clock loop can defer it).
    end
        Ends a request the controller holds as running.
    """

    def __init__(
        self,
        lanes: Sequence[Lane],
        max_retries: int,
        result: LoopResult,
        *,
        abort: Abort,
        end: Callable[[Completion], None],
    ) -> None:
        self.lanes = lanes
        self.max_retries = max_retries
        self.result = result
        self._abort = abort
        self._end = end
        self._used: dict[str, int] = {}  # retries used, only for requests that faulted

    def fault(
        self,
        lane: Lane,
        ids: Sequence[str],
        reason: FailureReason,
        detail: str,
        now: float,
        *,
        abort: bool = True,
        counted: bool = False,
    ) -> None:
        """Take ``ids`` off ``lane`` after a fault; retry each elsewhere or fail it.

        ``abort=False`` leaves the executor alone (a hung call still holds it); ``counted``
        says the fault was already counted in ``result.faults``.
        """
        if not counted:
            self.result.faults += 1
        logger.warning(
            "%s: %s (%s) affecting %d requests", lane.executor.name, reason, detail, len(ids)
        )
        others = [o for o in self.lanes if o is not lane and o.stuck is None]
        target = others[0] if others else (lane if lane.stuck is None else None)
        for rid in ids:
            request = lane.inflight.pop(rid, None)
            if request is None:
                continue
            if abort:
                self._abort(lane, rid, now)
            used = self._used.get(rid, 0)
            if target is not None and used < self.max_retries:
                self._used[rid] = used + 1
                target.retry.append(request)
                self.result.retries += 1
            else:
                self._used.pop(rid, None)
                self._end(Completion.failed(request, reason, detail, now, lane.executor.name))

    def forget(self, request_id: str) -> None:
        """The request ended some other way (finished, cancelled): its retry count goes."""
        self._used.pop(request_id, None)
