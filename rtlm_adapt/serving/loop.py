"""The serving loop: arrivals in, controller decisions out, executors driven, completions back.

``ServingLoop`` runs on virtual time (discrete events) over executors that report their own
durations, such as :class:`~rtlm_adapt.serving.sim.SimulatedExecutor`. It is resumable —
``advance(t)`` runs until virtual time ``t`` and can be called again — so the RL environment
steps the very loop that the benchmarks run, one scheduling epoch at a time.

Event order at one instant: executors that finish a step report first (freeing slots), then
arrivals up to that instant are submitted, then every idle executor asks the controller for work
and starts its next step. In ``continuous`` batching an executor takes new requests between any
two steps; in ``static`` batching only when its batch is empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rtlm_adapt.request import Completion, Request
from rtlm_adapt.serving.base import Executor, ExecutorState, StepResult

BATCHING_MODES = ("continuous", "static")


@dataclass(slots=True)
class _Lane:
    """One executor and the step it is in the middle of."""

    executor: Executor
    role: str
    busy_until: float = math.inf
    pending: StepResult | None = None


@dataclass(slots=True)
class LoopResult:
    completions: list[Completion] = field(default_factory=list)
    submitted: int = 0
    rejected: int = 0
    end_time: float = 0.0


class ServingLoop:
    """Drives executors with a controller's decisions on virtual time.

    Parameters
    ----------
    controller
        An :class:`~rtlm_adapt.controller.AdaptiveController` (anything with ``submit``,
        ``next_batch``, ``on_step``, ``on_finish``).
    primary, secondary
        The executors; ``secondary`` (optional) receives offloaded requests.
    batching
        ``continuous`` or ``static``.
    on_completion
        Called with each Completion as it happens.
    """

    def __init__(
        self,
        controller,
        primary: Executor,
        secondary: Executor | None = None,
        *,
        batching: str = "continuous",
        on_completion: Callable[[Completion], None] | None = None,
    ) -> None:
        if batching not in BATCHING_MODES:
            raise ValueError(f"unknown batching mode {batching!r}; expected one of {BATCHING_MODES}")
        self.controller = controller
        self.batching = batching
        self.on_completion = on_completion
        self._lanes = [_Lane(primary, "primary")]
        if secondary is not None:
            if secondary.name == primary.name:
                raise ValueError("primary and secondary executors need different names")
            self._lanes.append(_Lane(secondary, "secondary"))
        self._arrivals: list[Request] = []
        self._next = 0
        self.now = 0.0
        self.result = LoopResult()

    # -- feeding -------------------------------------------------------------------------------
    def add_requests(self, requests: Sequence[Request]) -> None:
        """Schedule arrivals (any order; each is submitted at its arrival_time)."""
        pending = self._arrivals[self._next :] + list(requests)
        for r in requests:
            if r.arrival_time < self.now:
                raise ValueError(
                    f"request {r.id!r} arrives at {r.arrival_time}, before the loop's time {self.now}"
                )
        pending.sort(key=lambda r: r.arrival_time)
        self._arrivals, self._next = pending, 0

    @property
    def done(self) -> bool:
        """No arrivals left, nothing running, nothing queued."""
        return (
            self._next >= len(self._arrivals)
            and all(lane.pending is None for lane in self._lanes)
            and len(self.controller) == 0
        )

    def run(self, requests: Sequence[Request] = ()) -> LoopResult:
        """Serve ``requests`` (plus any added before) to the end."""
        if requests:
            self.add_requests(requests)
        self.advance(math.inf)
        return self.result

    # -- the event loop ------------------------------------------------------------------------
    def advance(self, until: float) -> bool:
        """Process every event up to virtual time ``until``; returns ``self.done``."""
        lanes = self._lanes
        while True:
            next_arrival = (
                self._arrivals[self._next].arrival_time if self._next < len(self._arrivals) else math.inf
            )
            next_finish = min(lane.busy_until for lane in lanes)
            t = min(next_arrival, next_finish)
            if t == math.inf:
                if len(self.controller) and self._dispatch(self.now):
                    continue  # work was queued while executors were idle (e.g. knobs changed)
                if len(self.controller):
                    raise RuntimeError(
                        f"{len(self.controller)} requests are queued but no executor will take "
                        "them (check the knobs and executor batch sizes)"
                    )
                self.now = max(self.now, until) if until < math.inf else self.now
                return True
            if t > until:
                self.now = until
                self._dispatch(until)
                return False
            self.now = t
            for lane in lanes:
                if lane.busy_until == t:
                    self._finish_step(lane)
            while self._next < len(self._arrivals) and self._arrivals[self._next].arrival_time <= t:
                self.controller.submit(self._arrivals[self._next])
                self._next += 1
                self.result.submitted += 1
            self._dispatch(t)

    def _dispatch(self, now: float) -> bool:
        """Give every idle executor work; returns True if any step started."""
        started = False
        next_arrival = (
            self._arrivals[self._next].arrival_time if self._next < len(self._arrivals) else math.inf
        )
        for lane in self._lanes:
            if lane.pending is not None:
                continue
            ex = lane.executor
            if self.batching == "continuous" or ex.running() == 0:
                state = ExecutorState(ex.name, lane.role, ex.running(), ex.max_batch_size, now)
                batch = self.controller.next_batch(state)
                if batch:
                    ex.admit(batch, now)
            if ex.running() == 0:
                continue
            # While the batch is full nobody can join, so a simulator may fuse steps freely.
            horizon = math.inf if ex.running() >= ex.max_batch_size else next_arrival
            result = ex.step(now, horizon)
            lane.pending = result
            lane.busy_until = now + result.duration_s
            started = True
        return started

    def _finish_step(self, lane: _Lane) -> None:
        result = lane.pending
        lane.pending = None
        lane.busy_until = math.inf
        assert result is not None
        self.controller.on_step(lane.executor.name, result)
        for completion in result.finished:
            self.controller.on_finish(completion)
            self.result.completions.append(completion)
            if self.on_completion is not None:
                self.on_completion(completion)
        self.result.end_time = self.now
