"""The serving loop: arrivals in, controller decisions out, executors driven, completions back.

``ServingLoop`` runs on virtual time (discrete events) over executors that report their own
durations, such as :class:`~rtlm_adapt.serving.sim.SimulatedExecutor`. It is resumable —
``advance(t)`` runs until virtual time ``t`` and can be called again — so the RL environment
steps the very loop that the benchmarks run, one scheduling epoch at a time.

Event order at one instant: executors that finish a step report first (freeing slots), then
cancellations are applied, then arrivals up to that instant are submitted, then every idle
executor asks the controller for work and starts its next step. In ``continuous`` batching an
executor takes new requests between any two steps; in ``static`` batching only when its batch is
empty.

Faults. Every request the loop hands to an executor ends exactly once. A step that raises, that
returns garbage (a non-finite or negative duration, negative token counts, a result that is not
a StepResult) or that runs past ``step_timeout_s`` (virtual seconds) or ``wall_timeout_s`` (real
seconds, for real executors) is a fault: the requests in it are aborted on that executor and
retried on the other one (on the same one when there is no other) up to ``max_retries`` times,
then failed with the error (reason ``executor_failure`` or ``timed_out``). A single bad
completion (NaN times, negative tokens) faults only its request; completions for unknown ids
and duplicates are dropped; a request the executor silently lost is faulted. The controller
learns only from results that passed these checks.

The loop keeps the event order and the steps; small parts end requests early, each in its own
module: :mod:`~rtlm_adapt.serving.retries` (a fault's requests: retried elsewhere or failed),
:mod:`~rtlm_adapt.serving.hung_steps` (a wall-clock step that does not return, and its executor
after it), :mod:`~rtlm_adapt.serving.cancellations` (queued and running requests the client gave
up on) and :mod:`~rtlm_adapt.serving.shutdown` (``shutdown(drain=False)``: fail what was
accepted). What the loop did is a :class:`~rtlm_adapt.serving.loop_result.LoopResult`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
from collections.abc import Callable, Sequence

from rtlm_adapt.request import Completion, FailureReason, Request, RequestRefused
from rtlm_adapt.serving import shutdown
from rtlm_adapt.serving.base import Executor, ExecutorState, StepResult
from rtlm_adapt.serving.cancellations import Cancellations
from rtlm_adapt.serving.hung_steps import StepHung, back_in_service, step_with_timeout
from rtlm_adapt.serving.lane import Lane
from rtlm_adapt.serving.loop_result import LoopResult
from rtlm_adapt.serving.retries import Retries
from rtlm_adapt.serving.step_checks import check_completion, check_step

logger = logging.getLogger(__name__)

BATCHING_MODES = ("continuous", "static")


class ServingLoop:
    """Drives executors with a controller's decisions on virtual time.

    Parameters
    ----------
    controller
        An :class:`~rtlm_adapt.controller.AdaptiveController` (anything with ``submit``,
        ``next_batch``, ``on_step``, ``on_finish``).
    primary, secondary
        The executors; ``secondary`` (optional) receives offloaded requests. ``primary`` may be
        several executors (a router's replicas, as behind a gateway with several backends):
        each asks the controller for work as a primary.
    batching
        ``continuous`` or ``static``.
    on_completion
        Called with each Completion as it happens (failures included).
    max_retries
        How many times a request hit by an executor fault is re-admitted before it fails.
    step_timeout_s
        Virtual-time hang limit: a step reporting a longer duration is given up on after this
        many seconds and its requests are retried or failed (``timed_out``).
    wall_timeout_s
        Real-time hang limit, for executors that really compute: each step runs on a worker
        thread and is abandoned after this many wall-clock seconds; the executor is then out of
        service until the stuck call returns.
    keep_completions
        Keep every Completion in ``result.completions`` (memory grows with the run). Long-running
        services pass False and consume ``on_completion`` instead.
    """

    def __init__(
        self,
        controller,
        primary: Executor | Sequence[Executor],
        secondary: Executor | None = None,
        *,
        batching: str = "continuous",
        on_completion: Callable[[Completion], None] | None = None,
        max_retries: int = 1,
        step_timeout_s: float | None = None,
        wall_timeout_s: float | None = None,
        keep_completions: bool = True,
    ) -> None:
        if batching not in BATCHING_MODES:
            raise ValueError(
                f"unknown batching mode {batching!r}; expected one of {BATCHING_MODES}"
            )
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        for name, value in (("step_timeout_s", step_timeout_s), ("wall_timeout_s", wall_timeout_s)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        self.controller = controller
        self.batching = batching
        self.on_completion = on_completion
        self.step_timeout_s = step_timeout_s
        self.wall_timeout_s = wall_timeout_s
        self.keep_completions = keep_completions
        primaries = list(primary) if isinstance(primary, Sequence) else [primary]
        if not primaries:
            raise ValueError("ServingLoop needs at least one primary executor")
        self._lanes = [Lane(ex, "primary") for ex in primaries]
        if secondary is not None:
            self._lanes.append(Lane(secondary, "secondary"))
        names = [lane.executor.name for lane in self._lanes]
        if len(set(names)) < len(names):
            raise ValueError(f"the executors need different names, got {names}")
        register = getattr(controller, "register_executor", None)
        if callable(register):  # the first policy epoch then already sees every executor
            for lane in self._lanes:
                ex = lane.executor
                register(ExecutorState(ex.name, lane.role, 0, ex.max_batch_size, 0.0))
        self._arrivals: list[Request] = []
        self._next = 0
        self.now = 0.0
        self.result = LoopResult()
        # the parts that end requests early; each ends a request through the loop's _end/_emit
        # and takes it off an executor through _abort_quietly (a wall-clock loop defers that)
        abort, end, emit = self._abort_quietly, self._end, self._emit
        self._retries = Retries(self._lanes, max_retries, self.result, abort=abort, end=end)
        self._cancellations = Cancellations(
            controller, self._lanes, self._retries, abort=abort, end=end, emit=emit
        )

    @property
    def max_retries(self) -> int:
        """How many times a request hit by an executor fault is re-admitted before it fails."""
        return self._retries.max_retries

    # -- feeding -------------------------------------------------------------------------------
    def add_requests(self, requests: Sequence[Request]) -> None:
        """Schedule arrivals (any order; each is submitted at its arrival_time)."""
        requests = list(requests)  # a generator is read once
        for r in requests:
            if not isinstance(r, Request):
                raise TypeError(f"add_requests() takes Requests, got {type(r).__name__}")
            if r.arrival_time < self.now:
                raise ValueError(
                    f"request {r.id!r} arrives at {r.arrival_time}, "
                    f"before the loop's time {self.now}"
                )
        pending = self._arrivals[self._next :] + requests
        pending.sort(key=lambda r: r.arrival_time)
        self._arrivals, self._next = pending, 0

    def submit_now(self, request: Request) -> bool:
        """Submit ``request`` at the loop's current time (a live front end's arrivals).

        Returns False if it was not accepted; it has then already ended with a failure
        Completion (``rejected`` or ``shutdown``), reported like any other.
        """
        return self._submit(request, self.now)

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request; False if it is not live in the controller.

        A queued request ends at once; a running one when the loop next handles events (it is
        aborted on its executor). Either way it ends with a ``cancelled`` failure Completion.
        """
        return self._cancellations.cancel(request_id, self.now)

    def shutdown(self, *, drain: bool = True) -> LoopResult:
        """Stop: arrivals not yet submitted fail (``shutdown``); then either serve what was
        accepted to the end (``drain=True``) or fail it (``drain=False``)."""
        close = getattr(self.controller, "close", None)
        if close is not None:
            close()
        while self._next < len(self._arrivals):  # the closed controller refuses each one
            request = self._arrivals[self._next]
            self._next += 1
            self._submit(request, max(self.now, request.arrival_time))
        self._arrivals, self._next = [], 0
        if drain:
            self.advance(math.inf)
        else:
            shutdown.fail_accepted(
                self.controller,
                self._lanes,
                self.now,
                abort=self._abort_quietly,
                end=self._end,
                emit=self._emit,
            )
        for lane in self._lanes:
            if lane.pool is not None:
                lane.pool.shutdown(wait=False)
        return self.result

    @property
    def done(self) -> bool:
        """No arrivals left, nothing running, nothing queued."""
        return (
            self._next >= len(self._arrivals)
            and all(
                lane.pending is None and not lane.retry and not lane.inflight
                for lane in self._lanes
            )
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
        self._cancellations.apply(self.now)  # those requested since the last call
        while True:
            next_arrival = self._next_arrival()
            next_finish = min(lane.busy_until for lane in lanes)
            t = min(next_arrival, next_finish)
            if t == math.inf:
                self._cancellations.apply(self.now)
                waiting = len(self.controller) or any(lane.retry for lane in lanes)
                if waiting and self._dispatch(self.now):
                    continue  # work was queued while executors were idle (e.g. knobs changed)
                stuck = [lane.stuck for lane in lanes if lane.stuck is not None]
                if stuck and (waiting or any(lane.inflight for lane in lanes)):
                    # only a hung executor could take the work: wait for it to come back
                    concurrent.futures.wait(
                        stuck,
                        timeout=self.wall_timeout_s,
                        return_when=concurrent.futures.FIRST_COMPLETED,
                    )
                    self._dispatch(self.now)
                    continue
                if waiting:
                    raise RuntimeError(
                        f"{len(self.controller)} requests are queued but no executor will take "
                        "them (check the knobs and executor batch sizes)"
                    )
                self.now = max(self.now, until) if until < math.inf else self.now
                return True
            if t > until:
                self.now = until
                self._cancellations.apply(until)
                self._dispatch(until)
                return False
            self.now = t
            for lane in lanes:
                if lane.busy_until == t:
                    self._finish_step(lane)
            self._cancellations.apply(t)
            self._submit_arrivals(t)
            self._dispatch(t)

    def _next_arrival(self) -> float:
        """When the next not-yet-submitted request arrives (inf when none is left)."""
        if self._next < len(self._arrivals):
            return self._arrivals[self._next].arrival_time
        return math.inf

    def _submit_arrivals(self, now: float) -> None:
        """Submit every request that has arrived by ``now``."""
        arrivals = self._arrivals
        while self._next < len(arrivals) and arrivals[self._next].arrival_time <= now:
            request = arrivals[self._next]
            self._next += 1
            self._submit(request, now)
        if self._next > 4096 and 2 * self._next > len(arrivals):
            # drop submitted arrivals so a long feed does not keep every Request alive
            del arrivals[: self._next]
            self._next = 0

    def _dispatch(self, now: float) -> bool:
        """Give every idle executor work; returns True if any step started or a fault moved
        requests on (progress either way: each fault uses up a retry or ends requests)."""
        started = False
        faults_before = self.result.faults
        next_arrival = self._next_arrival()
        # A fault moves requests to another lane's retry queue; a second pass lets that lane
        # take them at this same instant even if it was visited first.
        for _ in range(2):
            faults = self.result.faults
            for lane in self._lanes:
                if lane.pending is None and self._lane_usable(lane, now):
                    started |= self._start_step(lane, now, next_arrival)
            if self.result.faults == faults:
                break
        return started or self.result.faults != faults_before

    def _fill(self, lane: Lane, now: float) -> bool:
        """Admit retries, then the controller's choice, onto an idle lane; True if it has work.

        Executor errors propagate (the caller faults the lane's requests)."""
        ex = lane.executor
        batch: list[Request] = []
        if self.batching == "continuous" or ex.running() == 0:
            room = ex.max_batch_size - ex.running()
            while lane.retry and len(batch) < room:
                batch.append(lane.retry.popleft())
            running = ex.running() + len(batch)
            state = ExecutorState(ex.name, lane.role, running, ex.max_batch_size, now)
            batch += self.controller.next_batch(state)
            if batch:
                for request in batch:
                    lane.inflight[request.id] = request
                ex.admit(batch, now)
        if not lane.inflight:
            return False
        lane.step_ids = list(lane.inflight)
        return True

    def _start_step(self, lane: Lane, now: float, next_arrival: float) -> bool:
        ex = lane.executor
        try:
            if not self._fill(lane, now):
                return False
            # While the batch is full nobody can join, so a simulator may fuse steps freely.
            horizon = math.inf if ex.running() >= ex.max_batch_size else next_arrival
            result = self._call_step(lane, now, horizon)
        except StepHung as hung:
            self._retries.fault(
                lane, lane.step_ids, FailureReason.TIMED_OUT, str(hung), now, abort=False
            )
            return False
        except Exception as exc:  # any executor error is a fault of this step, not of the loop
            self._retries.fault(
                lane, list(lane.inflight), FailureReason.EXECUTOR_FAILURE, f"{exc!r}", now
            )
            return False
        problem = check_step(result)
        if problem is not None:
            self.result.garbage += 1
            self._retries.fault(
                lane, lane.step_ids, FailureReason.EXECUTOR_FAILURE, f"garbage step: {problem}", now
            )
            return False
        duration = result.duration_s
        if self.step_timeout_s is not None and duration > self.step_timeout_s:
            lane.fault = (FailureReason.TIMED_OUT, f"step ran past {self.step_timeout_s} s")
            duration = self.step_timeout_s
        lane.pending = result
        lane.busy_until = now + duration
        return True

    def _call_step(self, lane: Lane, now: float, horizon: float) -> StepResult:
        if self.wall_timeout_s is None:
            return lane.executor.step(now, horizon)
        return step_with_timeout(lane, now, horizon, self.wall_timeout_s)

    def _lane_usable(self, lane: Lane, now: float) -> bool:
        return lane.stuck is None or back_in_service(lane, now, self._abort_quietly)

    def _finish_step(self, lane: Lane) -> None:
        result = lane.pending
        lane.pending = None
        lane.busy_until = math.inf
        assert result is not None
        now = self.now
        self.result.end_time = now
        if lane.fault is not None:
            (reason, detail), lane.fault = lane.fault, None
            self.result.faults += 1
            self._retries.fault(lane, lane.step_ids, reason, detail, now, counted=True)
            return
        self.controller.on_step(lane.executor.name, result)
        ended: set[str] = set()
        for completion in result.finished:
            rid = getattr(completion, "request_id", None)
            if rid not in lane.inflight or rid in ended:
                # unknown, duplicate, or already ended here (cancelled, faulted): ignore
                self.result.dropped += 1
                continue
            ended.add(rid)
            problem = check_completion(completion)
            if problem is not None:
                self.result.garbage += 1
                self._retries.fault(
                    lane,
                    [rid],
                    FailureReason.EXECUTOR_FAILURE,
                    f"garbage completion: {problem}",
                    now,
                )
                continue
            del lane.inflight[rid]
            self._retries.forget(rid)
            self._end(completion)
        # A request neither finished nor still in the executor was lost by it: fault it.
        missing = [rid for rid in lane.step_ids if rid in lane.inflight and rid not in ended]
        if missing:
            try:
                still = set(lane.executor.running_ids())
            except Exception:  # noqa: BLE001
                still = set()
            lost = [rid for rid in missing if rid not in still]
            if lost:
                self._retries.fault(
                    lane, lost, FailureReason.EXECUTOR_FAILURE, "executor lost the request", now
                )

    # -- ending requests -----------------------------------------------------------------------
    def _submit(self, request: Request, now: float) -> bool:
        self.result.submitted += 1
        try:
            self.controller.submit(request)
            return True
        except (TypeError, ValueError) as exc:  # invalid: the controller did not count it
            reason, detail = FailureReason.REJECTED, f"invalid request: {exc}"
        except RequestRefused as exc:  # a full queue or a closed controller: counted there
            reason, detail = exc.reason, str(exc)
        except RuntimeError as exc:  # another controller's refusal
            reason, detail = FailureReason.REJECTED, str(exc)
        self.result.rejected += 1
        if isinstance(request, Request):
            self._emit(Completion.failed(request, reason, detail, now))
        else:
            logger.warning("dropped a submission that is not a Request: %s", detail)
        return False

    def _abort_quietly(self, lane: Lane, rid: str, now: float) -> None:
        try:
            lane.executor.abort(rid, now)
        except Exception:  # noqa: BLE001 - the request ends anyway; the executor is suspect
            logger.warning("%s: abort(%r) failed", lane.executor.name, rid, exc_info=True)

    def _end(self, completion: Completion) -> None:
        """A request the controller holds as running ends: account for it, then report it."""
        self.controller.on_finish(completion)
        self._emit(completion)

    def _emit(self, completion: Completion) -> None:
        self.result.record(completion, keep=self.keep_completions)
        if self.on_completion is not None:
            self.on_completion(completion)
