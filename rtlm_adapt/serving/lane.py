"""Lane: one executor as the serving loop drives it.

A lane holds the executor, the step it is in the middle of, the requests the loop placed on it
and those waiting to be retried there. :class:`~rtlm_adapt.serving.loop.ServingLoop` keeps one
per executor (primary, then the optional secondary); the wall-clock
:class:`~rtlm_adapt.serving.realtime.RealTimeLoop` adds a worker thread per lane.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections import deque
from dataclasses import dataclass, field

from rtlm_adapt.request import FailureReason, Request
from rtlm_adapt.serving.base import Executor, StepResult


@dataclass(slots=True, eq=False)
class Lane:
    """One executor, the step it is in the middle of, and the requests the loop placed on it."""

    executor: Executor
    role: str
    busy_until: float = math.inf
    pending: StepResult | None = None
    #: requests admitted here that have not ended (the loop's truth, whatever the executor says)
    inflight: dict[str, Request] = field(default_factory=dict)
    #: ids in the pending step
    step_ids: list[str] = field(default_factory=list)
    #: set when the pending step is a (virtual-time) hang: (reason, detail) reported at its end
    fault: tuple[FailureReason, str] | None = None
    #: requests to retry here (faulted elsewhere); they go before the controller's next batch
    retry: deque[Request] = field(default_factory=deque)
    #: wall-clock mode: the worker thread that runs steps, and a step that never came back
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    stuck: concurrent.futures.Future | None = None
