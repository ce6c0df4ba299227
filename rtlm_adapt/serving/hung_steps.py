"""Hung steps: a real executor's step that does not return in time, and its executor after it.

With ``wall_timeout_s`` set, :class:`~rtlm_adapt.serving.loop.ServingLoop` runs each step on the
lane's worker thread and waits at most that long (:func:`step_with_timeout`). A step that does
not return is abandoned: the loop faults its requests (``timed_out``) and the lane keeps the
call's future as ``stuck``. The executor is then out of service, since the loop never touches an
executor in the middle of a call. Once the call returns, :func:`back_in_service` puts the lane
back, aborting whatever the executor still holds that the loop no longer placed there.
"""

from __future__ import annotations

import concurrent.futures

from rtlm_adapt.serving.base import StepResult
from rtlm_adapt.serving.lane import Lane
from rtlm_adapt.serving.retries import Abort


class StepHung(Exception):
    """A wall-clock step did not return within ``wall_timeout_s``."""


def step_with_timeout(lane: Lane, now: float, horizon: float, timeout_s: float) -> StepResult:
    """``lane.executor.step(now, horizon)`` on the lane's worker thread, waiting ``timeout_s``
    wall seconds at most; past that the lane is marked stuck and :class:`StepHung` raised."""
    if lane.pool is None:
        lane.pool = concurrent.futures.ThreadPoolExecutor(1, f"step-{lane.executor.name}")
    future = lane.pool.submit(lane.executor.step, now, horizon)
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        lane.stuck = future
        raise StepHung(f"step ran past {timeout_s} s of wall time") from None


def back_in_service(lane: Lane, now: float, abort: Abort) -> bool:
    """Whether ``lane`` can take a step: True unless a hung call still holds its executor.

    The first time it is asked after the call returned, the executor's leftovers (requests the
    loop already ended) are aborted. An executor that cannot say what it holds stays out."""
    stuck = lane.stuck
    if stuck is None:
        return True
    if not stuck.done():
        return False
    # The hung call came back: whatever it still holds is no longer ours.
    lane.stuck = None
    try:
        leftovers = lane.executor.running_ids()
    except Exception:  # noqa: BLE001 - a broken executor stays out of service
        lane.stuck = stuck
        return False
    for rid in leftovers:
        if rid not in lane.inflight:
            abort(lane, rid, now)
    return True
